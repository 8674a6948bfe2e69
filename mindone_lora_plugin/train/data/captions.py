"""Caption augmentation as kohya does it: ``--shuffle_caption --keep_tokens --caption_dropout_rate``.

Each draw comes from the generator the batch plan seeds with ``(seed, epoch, example)``, so a resumed run sees the
same captions an uninterrupted one would.
"""

from __future__ import annotations


class CaptionAugment:
    """Shuffle comma-separated tags after the first ``keep_tokens`` ones; drop the whole caption with a probability."""

    def __init__(self, shuffle: bool = False, keep_tokens: int = 0, dropout_rate: float = 0.0, separator: str = ","):
        self.shuffle, self.keep_tokens, self.dropout_rate = shuffle, keep_tokens, dropout_rate
        self.separator = separator

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout_rate > 0

    @classmethod
    def from_args(cls, args) -> "CaptionAugment":
        return cls(bool(getattr(args, "shuffle_caption", False)), int(getattr(args, "keep_tokens", 0) or 0),
                   float(getattr(args, "caption_dropout_rate", 0.0) or 0.0))

    def __call__(self, caption: str, rng) -> str:
        if self.dropout_rate > 0 and rng.random() < self.dropout_rate:
            return ""  # the unconditional caption, as kohya's caption dropout
        if not self.shuffle:
            return caption
        tags = [t.strip() for t in caption.split(self.separator)]
        tags = [t for t in tags if t]
        fixed, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
        order = rng.permutation(len(rest))
        return (self.separator + " ").join(fixed + [rest[int(i)] for i in order])
