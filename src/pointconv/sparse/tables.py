"""spconv's ``spconv.pytorch.tables`` path, for ported code that imports the table modules from
there. ``AddTable`` / ``JoinTable`` need the same sites in the same order; ``AddTableMisaligned``
sums tensors with different sites (``functional.sparse_add``)."""
from .modules import AddTable, AddTableMisaligned, ConcatTable, JoinTable

__all__ = ["AddTable", "AddTableMisaligned", "ConcatTable", "JoinTable"]
