"""The flags of ``mindone-lora train`` and what becomes of them: the parser (:mod:`.training`, :mod:`.data`,
:mod:`.loss_and_optimizer`; features and families add theirs), ``--config_file`` (:mod:`.config_file`), every check
in one pipeline before a model loads (:mod:`.checks`, the rules in :mod:`.rules`) and the settings and metadata they
give (:mod:`.settings`)."""
