"""Detection methods: the plugin API and the registry of installed methods."""
