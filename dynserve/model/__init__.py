"""model/: checkpoint loader, layer modules, one file per architecture family, and the registry."""
