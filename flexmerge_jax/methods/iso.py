r"""Isotropic merging: Iso-C and Iso-CTS (flattened spectra of the summed task matrix)."""

from __future__ import annotations

from .. import kernels_extra
from ._common import fraction, numeric
from ._contract import GroupMerge, Method, Traits


def _merge_c(x, members, state, *, scale):
    del state
    return GroupMerge(kernels_extra.iso_c(x, members, scale=scale), None, None)


def _merge_cts(x, members, state, *, scale, common_fraction):
    del state
    return GroupMerge(kernels_extra.iso_cts(x, members, scale=scale,
                                            common_fraction=common_fraction), None, None)


def iso_c(scale=1.0) -> Method:
    r"""Iso-C: flatten the spectrum of the summed task matrix (non-matrix: mean).

    Args:
      scale: :math:`\alpha`; ``jax.typing.ArrayLike`` (traceable; the SVD's
        gradient is defined for distinct singular values).

    References:
      Marczak et al., No Task Left Behind: Isotropic Model Merging with
      Common and Task-Specific Subspaces, ICML 2025 (arXiv:2502.04959).
    """
    return Method("iso_c", _merge_c, numeric=(("scale", numeric("scale", scale)),),
                  traits=Traits(whole_parameter=True), builtin=True)


def iso_cts(scale=1.0, common_fraction: float = 0.8) -> Method:
    """Iso-CTS: Iso-C on a common subspace plus task-specific subspaces.

    Args:
      scale: as :func:`iso_c` (traceable).
      common_fraction: share of the rank given to the common subspace.
        Static: it fixes subspace sizes (array shapes).
    """
    f = fraction("common_fraction", common_fraction, "iso_cts", "it fixes subspace sizes")
    del f
    return Method("iso_cts", _merge_cts, numeric=(("scale", numeric("scale", scale)),),
                  static=(("common_fraction", common_fraction),),
                  traits=Traits(whole_parameter=True), builtin=True)
