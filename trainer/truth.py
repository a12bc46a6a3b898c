"""What theory says about a student on a teacher dataset: its learning coefficient, where it is known.

Known cases (regression with Gaussian noise of known sigma, inputs N(0, I), a linear teacher the student can
realise, i.e. rank <= the student's narrowest layer and no teacher offset a bias-free student cannot make):
- a linear student (no hidden layer): a regular model, lambda = d / 2 over its d parameters;
- a deep linear student without biases: Aoyagi (2024), Theorem 1, from the widths and the teacher's rank;
- a deep linear student with biases: the same plus d_out / 2. The map is x -> A x + c, and c (free through
  the last bias; the other biases only move along it) is a regular block orthogonal to A for centred inputs.
Classification teachers, nonlinear teachers or students, and unrealisable pairs: unknown (None). So is a deep
teacher (hidden layers) without `teacher_rank`: its default random init multiplies small singular values into
near-zero ones (0.005 for a 5-5-5-5 net), which the data cannot resolve, so its finite-n coefficient is not
the full-rank one (the 5-5-5-5 case of scripts/validate_llc.py measured 19-29% below it). With `teacher_rank`
every singular value of its map is 1 (trainer/data.py: build_teacher).
"""

from __future__ import annotations

from typing import Any

from trainer import learning_coefficient as lc


def _is_linear(spec: dict[str, Any]) -> bool:
    return spec.get("type") == "dlnn" or (spec.get("type") == "ffnn" and spec.get("hidden_layers") == 0)


def _widths(spec: dict[str, Any]) -> list[int]:
    inputs = 1
    for d in spec["input_shape"]:
        inputs *= d
    return [inputs] + [spec["hidden_nodes"]] * spec["hidden_layers"] + [spec["outputs"]]


def teacher_rank(dataset_spec: dict[str, Any]) -> int | None:
    """The rank of a linear teacher's map, where the data resolves it: the chosen one; full for a single layer;
    None for a deep default-init teacher (module docstring)."""
    teacher = dataset_spec["teacher_model"]
    if "teacher_rank" in dataset_spec:
        return dataset_spec["teacher_rank"]
    return min(_widths(teacher)) if teacher.get("hidden_layers", 0) == 0 else None


def true_learning_coefficient(model_spec: dict[str, Any], dataset_spec: dict[str, Any]) -> dict[str, Any] | None:
    """{"value": lambda, "source": how it follows} for the student `model_spec` on `dataset_spec`, or None."""
    if dataset_spec.get("name") != "teacher" or dataset_spec.get("task") != "regression":
        return None
    teacher = dataset_spec["teacher_model"]
    if not (_is_linear(teacher) and _is_linear(model_spec)):
        return None
    widths, rank = _widths(model_spec), teacher_rank(dataset_spec)
    bias = model_spec.get("bias", True)
    if teacher.get("bias", True) and not bias:
        return None  # the student cannot make the teacher's offset
    if len(widths) == 2:  # a linear student realises any linear teacher and is regular, whatever its rank
        d = widths[0] * widths[1] + (widths[1] if bias else 0)
        return {"value": lc.regular(d), "source": f"regular model: d/2, d = {d}"}
    if rank is None or rank > min(widths):
        return None  # unresolved teacher rank, or one the student cannot realise
    value = lc.deep_linear(widths, rank)
    source = f"Aoyagi (2024) Thm 1, widths {widths}, rank {rank}"
    if bias:
        value += widths[-1] / 2
        source += f", + d_out/2 = {widths[-1] / 2:g} for the biases"
    return {"value": value, "source": source}
