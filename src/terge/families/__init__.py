"""The newer merge methods' arithmetic, family by family, as pure functions over float64 tensors.

:mod:`terge.methods` wraps each in a registry entry (its settings checked, its paper cited); the
functions here take already-checked settings. Every one computes in the dtype it is given (terge
gives float64) and returns a new tensor; none modifies its inputs.

- :mod:`.elementwise`: DELLA, SCE, MagMax, TALL-mask consensus, PCB, NearSwap.
- :mod:`.spherical`: Multi-SLERP, NuSLERP, the Karcher mean.
- :mod:`.subspace`: TSV-M, Iso-C and Iso-CTS (singular value decompositions of 2-D tensors).
- :mod:`.statistics`: Fisher merging and RegMean from per-model statistics, and the hooks that
  compute them.
"""
