"""Training data: datasets and loaders (:mod:`.loader`, kohya's folders in :mod:`.kohya_folders`), aspect-ratio
buckets, captions, masks, DreamBooth class images, the latent and text-encoder caches, and how the trainer wires
them (:mod:`.setup`)."""
