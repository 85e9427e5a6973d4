"""What a failed rule says, and the error that carries every failed rule of one call."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Kind = Literal["crash", "corruption", "clean-error", "semantics"]


class Reason(BaseModel):
    """One failed rule for one call: stable id, the actual values, and how to fix it."""

    model_config = ConfigDict(frozen=True)

    rule: str
    message: str
    fix: str
    kind: Kind

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message}\n    fix: {self.fix}"


def _describe(value: Any) -> tuple[str, str, str, str]:
    """(shape, dtype, stride, device) of a tensor; a short repr for anything else."""
    import torch

    if isinstance(value, torch.Tensor):
        return (
            str(tuple(value.shape)),
            str(value.dtype).replace("torch.", ""),
            str(value.stride()),
            str(value.device),
        )
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return (text, "-", "-", "-")


def inputs_table(inputs: dict[str, Any]) -> str:
    """A fixed-width table of the tensor arguments: name, shape, dtype, stride, device."""
    rows = [("name", "shape", "dtype", "stride", "device")]
    rows += [(name, *_describe(value)) for name, value in inputs.items() if value is not None]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in rows
    )


class FA2ContractError(ValueError):
    """A FA-2 call broke the input contract; ``.reasons`` lists every failed rule.

    The message is meant for a log: a header, a table of the inputs, then each reason with its fix.
    """

    def __init__(
        self,
        reasons: list[Reason],
        *,
        call: str = "FA-2 call",
        inputs: dict[str, Any] | None = None,
        settings: str = "",
    ) -> None:
        self.reasons = list(reasons)
        self.inputs = dict(inputs or {})
        lines = [f"{call} breaks the FA-2 input contract ({len(self.reasons)} reason(s))"]
        if settings:
            lines.append(f"  {settings}")
        if self.inputs:
            lines.append(inputs_table(self.inputs))
        lines += [str(reason) for reason in self.reasons]
        super().__init__("\n".join(lines))

    @property
    def rules(self) -> list[str]:
        """The failed rule ids, in the order they were found."""
        return [reason.rule for reason in self.reasons]
