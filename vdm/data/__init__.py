"""Shard format (``vdm.data.format``), shard specs (``vdm.data.spec``) and the streaming loader (``vdm.data.stream``)."""
