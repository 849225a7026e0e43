"""Layer mappings: data plus pure functions from (student blocks, teacher blocks) to (student, teacher) pairs.

Layer numbers are 1-based block numbers with 0 = embeddings (docs/methods.md#layer-mappings).
"""
from __future__ import annotations

from collections.abc import Callable

from .registry import Registry

Pairs = list[tuple[int, int]]
MAPPINGS: Registry[Callable[[int, int, bool], Pairs]] = Registry("layer mapping")


@MAPPINGS.register("last")
def last(n_student: int, n_teacher: int, with_embeddings: bool = False) -> Pairs:
    """Student last block <-> teacher last block (CR-ILD's L-ILD; MiniLM)."""
    return [(n_student, n_teacher)]


@MAPPINGS.register("uniform")
def uniform(n_student: int, n_teacher: int, with_embeddings: bool = False) -> Pairs:
    """Student block i <-> teacher block k*i with k = n_teacher / n_student (plus 0 <-> 0 for hidden states).

    When n_teacher is not a multiple of n_student, teacher block floor(i * n_teacher / n_student) is used,
    which equals k*i whenever k is an integer and always ends at the teacher's last block.
    """
    pairs = [(i, (i * n_teacher) // n_student) for i in range(1, n_student + 1)]
    return ([(0, 0)] if with_embeddings else []) + pairs


def resolve_mapping(
    spec: str | list[list[int]] | None,
    n_student: int,
    n_teacher: int,
    *,
    with_embeddings: bool,
    default: str = "uniform",
    where: str = "mapping",
) -> Pairs:
    """Turn a config mapping into validated (student, teacher) pairs.

    Args:
        spec: ``last``, ``uniform``, explicit ``[[s, t], ...]`` or None for ``default``.
        with_embeddings: whether layer 0 (embedding output) is allowed (hidden states) or not (attention).
        where: the config path used in error messages.

    Raises:
        ValueError: unknown mapping name, or a layer outside the models' range (the message states the range).
    """
    spec = default if spec is None else spec
    if isinstance(spec, str):
        return MAPPINGS.get(spec)(n_student, n_teacher, with_embeddings)
    low = 0 if with_embeddings else 1
    pairs = []
    for s, t in spec:
        if not low <= s <= n_student:
            raise ValueError(f"{where}: student layer {s} is out of range; valid: {low}..{n_student}")
        if not low <= t <= n_teacher:
            raise ValueError(f"{where}: teacher layer {t} is out of range; valid: {low}..{n_teacher}")
        pairs.append((int(s), int(t)))
    return pairs
