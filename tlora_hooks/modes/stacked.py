"""What the modes that stack same-shaped weights into one tensor (fold, low_memory) report the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule


class StackedMode:
    """A mode whose `stacks` each hold `modules` and the `nbytes` it added."""

    stacks: list

    @property
    def modules(self) -> list[TLoraModule]:
        return [module for stack in self.stacks for module in stack.modules]

    @property
    def extra_memory_bytes(self) -> int:
        """What the stacks hold beyond the model (see each mode's docstring), built so far."""
        return sum(stack.nbytes for stack in self.stacks)
