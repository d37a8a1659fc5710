"""Context parallelism (a transformer's sequence sharded over ranks: Ulysses / Ring attention) on
diffusers' engine, for every family, patched or not, with the step cache agreeing across ranks (it decides
from the transformer's output, which every rank gathers whole).

``enable``: ``dit_kernels.enable_parallelism`` / ``disable_parallelism`` (checks, mesh, config, hooks).
``plan``: the plan format and the shorthands families write their plans with (``Family.parallel_plan``).
``sharding``: a plan applied with torch hooks. ``attention``: the parallel attention with dit_kernels'
attention as the local op, which the fused processors call.

The modules the families import (``plan``, ``attention``) import no family, and this package imports
none of its modules, so ``models -> parallel.plan`` and ``parallel.enable -> models`` form no circle.
"""
