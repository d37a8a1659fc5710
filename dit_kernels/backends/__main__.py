"""``python -m dit_kernels.backends``: one line per capability, whether it can run here and why (not)."""

from dit_kernels import backends


def main() -> None:
    for availability in backends.report().values():
        mark = "yes" if availability.available else "no "
        print(f"{availability.name:16s} {mark}  {availability.reason}")


if __name__ == "__main__":
    main()
