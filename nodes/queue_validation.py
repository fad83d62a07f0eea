"""Queue-time validation: every Velox node refuses, when a prompt is queued, a widget value its schema
does not allow (a combo value not in its list, a number outside its min / max).

Why the nodes do this themselves: ComfyUI's ``execution.validate_inputs`` (0.3.75 and 0.8.0) skips
its own min / max and list checks for every input that a node's ``validate_inputs`` takes, and
0.3.75 checks a combo only when its type is a V1 option list, never a V3 ``COMBO``. So a V3 combo
(a model, LoRA or sampler name) and any number a custom check reads reached ``execute`` unchecked.
``VeloxNode.validate_inputs`` takes every input (``**values``) and checks them all from the schema,
the same way on every host; node-specific rules go in ``value_problems``.
"""

from __future__ import annotations

from comfy_api.latest import io

LISTED_CHOICES = 20  # longer option lists (model files) are summarised, as core does


def _declared(schema: io.Schema) -> dict[str, dict]:
    """Each input's options (``min``, ``max``, ``options``...) as the schema serialises them for ComfyUI."""
    return {declared.id: declared.as_dict() for declared in schema.inputs}


def _choices_text(options: list) -> str:
    if len(options) > LISTED_CHOICES:
        return f"one of the {len(options)} choices the node lists"
    return "one of: " + ", ".join(map(str, options)) if options else "listed, and the list is empty"


def value_problem(name: str, value, declared: dict) -> str | None:
    """What is wrong with one widget value against its declared options, or None."""
    if "options" in declared and value not in declared["options"]:
        return f"{name} {value!r} is not {_choices_text(declared['options'])}"
    numeric = "min" in declared or "max" in declared
    if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{name} {value!r} is not a number"
    if "min" in declared and value < declared["min"]:
        return f"{name} {value} is below the minimum {declared['min']}"
    if "max" in declared and value > declared["max"]:
        return f"{name} {value} is above the maximum {declared['max']}"
    return None


def schema_problems(schema: io.Schema, values: dict) -> list[str]:
    """Problems of the given values against the schema; None values (linked inputs, known only at
    run time) are skipped."""
    declared = _declared(schema)
    found = (value_problem(name, value, declared[name]) for name, value in values.items()
             if value is not None and name in declared)
    return [problem for problem in found if problem]


class VeloxNode(io.ComfyNode):
    """A V3 node whose widget values are checked against its schema when a prompt is queued."""

    @classmethod
    def value_problems(cls, values: dict) -> list[str]:
        """Node-specific rules beyond min / max / options (multiples of 32, 4n + 1 frames). They see
        every value, in range or not, and None for linked inputs."""
        return []

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        schema = cls.define_schema()
        problems = schema_problems(schema, values) + cls.value_problems(values)
        return f"{schema.node_id}: " + "; ".join(problems) if problems else True

    @classmethod
    def check_values(cls, **values) -> None:
        """The same checks at run time, for values that were linked at queue time."""
        message = cls.validate_inputs(**values)
        if message is not True:
            raise ValueError(message)
