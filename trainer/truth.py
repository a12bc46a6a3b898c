"""What theory says about a student on a teacher dataset: its learning coefficient, where it is known.

Known cases (regression with Gaussian noise of known sigma, inputs N(0, I), a linear teacher the student can
realise, i.e. rank <= the student's narrowest layer and no teacher offset a bias-free student cannot make):
- a linear student (no hidden layer): a regular model, lambda = d / 2 over its d parameters;
- a deep linear student without biases: Aoyagi (2024), Theorem 1, from the widths and the teacher's rank;
- a deep linear student with biases: the same plus d_out / 2. The map is x -> A x + c, and c (free through
  the last bias; the other biases only move along it) is a regular block orthogonal to A for centred inputs.
Classification teachers, nonlinear teachers or students, and unrealisable pairs: unknown (None).
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


def teacher_rank(dataset_spec: dict[str, Any]) -> int:
    """The rank of a linear teacher's map: the chosen one, or full (the default random init is full rank)."""
    return dataset_spec.get("teacher_rank", min(_widths(dataset_spec["teacher_model"])))


def true_learning_coefficient(model_spec: dict[str, Any], dataset_spec: dict[str, Any]) -> dict[str, Any] | None:
    """{"value": lambda, "source": how it follows} for the student `model_spec` on `dataset_spec`, or None."""
    if dataset_spec.get("name") != "teacher" or dataset_spec.get("task") != "regression":
        return None
    teacher = dataset_spec["teacher_model"]
    if not (_is_linear(teacher) and _is_linear(model_spec)):
        return None
    widths, rank = _widths(model_spec), teacher_rank(dataset_spec)
    bias = model_spec.get("bias", True)
    if rank > min(widths) or (teacher.get("bias", True) and not bias):
        return None  # the student cannot realise the teacher
    if len(widths) == 2:
        d = widths[0] * widths[1] + (widths[1] if bias else 0)
        return {"value": lc.regular(d), "source": f"regular model: d/2, d = {d}"}
    value = lc.deep_linear(widths, rank)
    source = f"Aoyagi (2024) Thm 1, widths {widths}, rank {rank}"
    if bias:
        value += widths[-1] / 2
        source += f", + d_out/2 = {widths[-1] / 2:g} for the biases"
    return {"value": value, "source": source}
