"""What the paths that stack same-shaped layers into groups (fold, low_memory) report the same way."""

from __future__ import annotations

from lycoris.modules.tlora import TLoraModule


class GroupedPath:
    """A path whose `groups` each hold `modules` and the `nbytes` it added."""

    groups: list

    @property
    def modules(self) -> list[TLoraModule]:
        return [module for group in self.groups for module in group.modules]

    @property
    def extra_memory_bytes(self) -> int:
        """What the groups hold beyond the model (see each path's docstring), built so far."""
        return sum(group.nbytes for group in self.groups)
