"""Sentences with pseudo-word slots, as token ids (METHOD §5).

Every sentence the method builds has the shape `<sot> head  * * ... *  tail <eot>`: a word part, `r`
placeholder tokens (`*`, whose embeddings are later replaced by pseudo-word tokens) and a second word
part. CLIP's BPE works word by word, so tokenising the whole string equals concatenating the BPE of
its space-separated parts; building the ids from parts lets `r` differ per row, without a Python loop
over the batch and without tokenising twelve variants of every caption. `tests/test_models.py`
checks the result against CLIP's tokenizer on the whole strings, truncation included.
"""
from __future__ import annotations

from typing import Sequence

import torch

PREFIX = "a photo of * with"  # the subject slot is the `*` here; attribute slots follow "with"


def _trim(ids: torch.Tensor) -> torch.Tensor:
    """Cut the zero padding after the batch's longest sentence (on the host, in data workers): the
    causal mask makes every end-token feature independent of what follows it."""
    return ids[:, : int(ids.argmax(dim=1).max()) + 1]


class PromptBuilder:
    """Token-id assembly for the method's sentences, from an open_clip `SimpleTokenizer`: `sot`, `eot` and
    `star` are its special ids. Each CLIP holds one (`FrozenCLIP.prompts`)."""

    def __init__(self, tokenizer, context_length: int = 77):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.sot = tokenizer.sot_token_id
        self.eot = tokenizer.eot_token_id
        star = tokenizer.encode("*")
        if len(star) != 1:
            raise ValueError(f"the tokenizer splits '*' into {star}; the method needs one token")
        self.star = star[0]
        self.prefix = torch.tensor(tokenizer.encode(PREFIX), dtype=torch.long)
        # position of the subject slot in every sentence that starts with PREFIX (after <sot>)
        self.subject_pos = 1 + int((self.prefix == self.star).nonzero()[0, 0])
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self):  # DataLoader workers get the builder without the device copies
        return {**self.__dict__, "_on_device": {}}

    # word parts -----------------------------------------------------------------------------------
    def encode_words(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """BPE ids of each text, no <sot>/<eot>, zero-padded: ([B, L], lengths [B])."""
        enc = [self.tokenizer.encode(t) for t in texts]
        lengths = torch.tensor([len(e) for e in enc], dtype=torch.long)
        out = torch.zeros(len(enc), max(1, int(lengths.max()) if len(enc) else 1), dtype=torch.long)
        for i, e in enumerate(enc):  # host-side tokenisation (data workers), not the model's hot path
            out[i, : len(e)] = torch.tensor(e, dtype=torch.long)
        return out, lengths

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP's own tokenisation of whole strings ([B, context_length])."""
        return self.tokenizer(list(texts), context_length=self.context_length)

    # assembly ------------------------------------------------------------------------------------
    def assemble(
        self,
        head: torch.Tensor,
        head_len: torch.Tensor,
        r: torch.Tensor,
        tail: torch.Tensor | None = None,
        tail_len: torch.Tensor | None = None,
        r_max: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`<sot> head[:head_len] *×r tail[:tail_len] <eot>`, truncated as CLIP's tokenizer does
        (cut to the context length, last kept token made <eot>).

        Returns ids [B, L], eot_pos [B] and slot_start [B] (position of the first `*` of the r).
        L is the context length, or, when `r_max` (an upper bound of r) is given, the longest these
        rows can be, known from tensor shapes alone: the padding after every end token is left out
        without reading anything back from the device. All arguments are tensors on one device;
        head may be [1, L] / head_len [1] for a shared head.
        """
        B = r.shape[0]
        C = self.context_length
        if r_max is not None:
            C = min(C, 2 + head.shape[1] + r_max + (0 if tail is None else tail.shape[1]))
        device = r.device
        head = head.expand(B, -1)
        head_len = head_len.expand(B)
        if tail is None:
            tail = torch.zeros(B, 1, dtype=torch.long, device=device)
            tail_len = torch.zeros(B, dtype=torch.long, device=device)
        j = torch.arange(C, device=device).unsqueeze(0)  # [1, C]
        hl, rr, tl = head_len.unsqueeze(1), r.unsqueeze(1), tail_len.unsqueeze(1)
        in_head = (j >= 1) & (j < 1 + hl)
        in_star = (j >= 1 + hl) & (j < 1 + hl + rr)
        in_tail = (j >= 1 + hl + rr) & (j < 1 + hl + rr + tl)
        head_vals = head.gather(1, (j - 1).clamp(0, head.shape[1] - 1).expand(B, -1))
        tail_vals = tail.gather(1, (j - 1 - hl - rr).clamp(0, tail.shape[1] - 1))
        ids = torch.where(in_head, head_vals, torch.zeros_like(head_vals))
        ids = torch.where(in_star, torch.full_like(ids, self.star), ids)
        ids = torch.where(in_tail, tail_vals, ids)
        ids[:, 0] = self.sot
        eot_pos = (1 + head_len + r + tail_len).clamp(max=self.context_length - 1)  # truncation: last becomes <eot>
        ids.scatter_(1, eot_pos.unsqueeze(1), self.eot)
        ids = torch.where(j > eot_pos.unsqueeze(1), torch.zeros_like(ids), ids)
        return ids, eot_pos, 1 + head_len

    def pseudo_word_sentence(self, r: torch.Tensor, tail: torch.Tensor | None = None,
                             tail_len: torch.Tensor | None = None, r_max: int | None = None):
        """`"a photo of * with " + "* " * r`, followed by a composed query's `tail`
        (= encode_words("but " + text)) when given; `assemble`'s outputs."""
        prefix, prefix_len = self._prefix_on(r.device)
        return self.assemble(prefix, prefix_len, r, tail, tail_len, r_max=r_max)

    def _prefix_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix ids [1, P] and their length [1] on `device`, copied there once: a step builds its
        sentences without a host-to-device copy."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.prefix.unsqueeze(0).to(device), torch.tensor([len(self.prefix)]).to(device))
        return self._on_device[key]

    # training texts (built in data-loader workers) ------------------------------------------------
    def training_texts(self, subjects: Sequence[str], attributes: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids for the regularisation loss of METHOD §6, for a batch of captions.

        `target_ids`: "a photo of <subject> with <attribute>" (CLIP's target feature `c`);
        `subject_ids`: "a photo of * with <attribute>" (only the subject slot is replaced);
        `attr_head`/`attr_head_len`: BPE of "a photo of <subject> with", to which the model appends
        the image's r attribute slots.
        """
        target = _trim(self.tokenize([f"a photo of {s} with {a}" for s, a in zip(subjects, attributes)]))
        subject = _trim(self.tokenize([f"a photo of * with {a}" for a in attributes]))
        head, head_len = self.encode_words([f"a photo of {s} with" for s in subjects])
        return {"target_ids": target, "subject_ids": subject, "attr_head": head, "attr_head_len": head_len}

    def query_tails(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The word part after the attribute slots of a composed query: "but " + text."""
        return self.encode_words([f"but {t}" for t in texts])
