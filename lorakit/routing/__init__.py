"""Which adapters apply to which rows and tokens: the routing strategies a host layer delegates to, the per-row
routing of a batch and the stacked (slot) path. The adapter pool that fills the slots is :mod:`lorakit.pool`."""
