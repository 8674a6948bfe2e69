"""Training features: EMA, validation loss, sample prompts, save cadence, … — each one module holding one
:class:`~mindone_lora_plugin.train.features.base.TrainingFeature`, registered through the
``mindone_lora_training_features`` discovery hook like any other plugin kind."""
