"""Let fairseq checkpoints load under torch's `weights_only=True` default (torch >= 2.6).

fairseq stores its configuration inside each checkpoint: an argparse Namespace (legacy args)
and omegaconf containers, plus a few plain Python and numpy types in the training state. Those
are allowlisted here, one by one, with `torch.serialization.add_safe_globals`; the safe
unpickler stays on for everything else.
"""

import argparse
import collections
import typing

import torch


def fairseq_checkpoint_types() -> list:
    import numpy as np
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode

    types = [
        argparse.Namespace,
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        BooleanNode,
        EnumNode,
        FloatNode,
        IntegerNode,
        StringNode,
        typing.Any,
        dict,
        list,
        int,
        float,
        collections.defaultdict,
        collections.OrderedDict,
        np.dtype,
    ]
    # numpy scalars (e.g. the best validation loss) pickle as numpy._core.multiarray.scalar + dtype
    # classes; numpy arrays (e.g. the BLEU n-gram counts that --eval-bleu keeps in the saved
    # metrics) as numpy._core.multiarray._reconstruct + ndarray. numpy < 2 names the module
    # numpy.core.multiarray: both names are allowed, so a checkpoint loads under either version.
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray
    for name in ("scalar", "_reconstruct"):
        obj = getattr(multiarray, name, None)
        types.extend((obj, f"{module}.{name}") for module in ("numpy.core.multiarray", "numpy._core.multiarray") if obj)
    types.append(np.ndarray)
    types.extend(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))
    # with several workers, rank 0 loads the checkpoint and fairseq broadcasts it to the others as a
    # torch.save'd buffer in which every tensor is replaced by this placeholder
    from fairseq.distributed.utils import _TensorPlaceholder

    types.append(_TensorPlaceholder)
    return [t for t in types if t is not None]


def allow_fairseq_checkpoints() -> None:
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(fairseq_checkpoint_types())
