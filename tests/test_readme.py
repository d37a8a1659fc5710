"""The README's "Try it in 30 seconds" block runs as written, and the documentation's links resolve inside
the repository (a clone has nothing outside it)."""

import re
from pathlib import Path

import dit_kernels

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _try_it_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- try-it:begin -->\n```python\n(.*?)```\n<!-- try-it:end -->", text, re.S)
    assert match, "README.md has no try-it:begin / try-it:end python block"
    return match.group(1)


def test_try_it_block_patches_a_tiny_pipeline_to_eager_parity(capsys):
    namespace = {}
    exec(compile(_try_it_block(), "README.md (try it)", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "dit (DiTTransformer2DModel)" in printed and "FusedAttnProcessor" in printed
    difference = float(re.search(r"max \|patched - eager\| = (\S+)", printed).group(1))
    assert difference <= 1e-5  # fp32, reference ops on CPU: eager's own math up to reduction order
    assert not dit_kernels.is_patched(namespace["pipe"])  # the block ends with unpatch


def test_documentation_links_resolve_inside_the_repository():
    for document in DOCUMENTS:
        text = document.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, f"{document.name} cites a file a clone lacks"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path = (document.parent / target).resolve()
            assert path.is_relative_to(ROOT), f"{document.name} links outside the repository: {target}"
            assert path.exists(), f"{document.name} links to a missing file: {target}"
