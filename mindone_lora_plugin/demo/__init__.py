"""The demo and the tiny models: ``mindone-lora train --demo`` (:mod:`.training`), the shipped pretrained shapes
base model (``assets/shapes-sd1``, made by :mod:`.pretrain`), the shapes world it draws (:mod:`.shapes`,
:mod:`.shapes_eval`) and what every family's tiny models share (:mod:`.tiny`)."""
