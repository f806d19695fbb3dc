"""Drop-in integrations with RL trainers: ``sdar.integrations.trl`` (TRL's GRPOTrainer) and
``sdar.integrations.verl`` (verl's loss registries and FSDP engine). Each imports its trainer itself;
importing ``sdar`` or this package imports neither."""
