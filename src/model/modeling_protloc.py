"""protloc's classification heads on transformers' BERT and ESM encoders.

Written by `protloc export --format hf` next to the weights of a model whose head has no
transformers class (linear, mlp, light-attention, the reference workflow's head, a membrane
output, or an ensemble). Load it with

    AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)

The modules carry protloc's tensor names, so the weights load as saved. The head settings
are the "protloc" section of config.json. Outputs: `logits` (an ensemble's: the mean of its
members' logits), `probabilities` (softmax, or sigmoid per location for multi-label, averaged
over an ensemble's members: protloc's probabilities) and `membrane_probability` (models with
a membrane output). Tokenize as `protloc_export.json` says (`preprocessing`).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel, BertPreTrainedModel, EsmModel, EsmPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


@dataclass
class ProtlocClassifierOutput(SequenceClassifierOutput):
    probabilities: Optional[torch.FloatTensor] = None
    membrane_probability: Optional[torch.FloatTensor] = None


class _Mlp(nn.Module):
    def __init__(self, width, hidden, labels, dropout):
        super().__init__()
        self.dense = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, labels)
        self.dropout = nn.Dropout(dropout)

    def features(self, pooled):
        return torch.relu(self.dropout(self.dense(pooled)))


class _LightAttention(nn.Module):
    """Stärk et al. 2021: two 1-D convolutions (stored as linear layers over the k shifted
    copies of the residues, offset-major), softmax and max pooling over residues, an MLP."""

    def __init__(self, width, hidden, labels, kernel, dropout):
        super().__init__()
        self.kernel = kernel
        self.feature_conv = nn.Linear(kernel * width, width)
        self.attention_conv = nn.Linear(kernel * width, width)
        self.dense = nn.Linear(2 * width, hidden)
        self.out = nn.Linear(hidden, labels)
        self.dropout = nn.Dropout(dropout)

    def features(self, x, mask):
        # x [B, L, H] residues (zeros elsewhere), mask [B, L].
        length, half = x.shape[1], self.kernel // 2
        padded = F.pad(x, (0, 0, half, self.kernel - 1 - half))
        cols = torch.cat([padded[:, j : j + length] for j in range(self.kernel)], dim=2)
        values = self.dropout(self.feature_conv(cols))
        neg = ((mask - 1.0) * 1e4).unsqueeze(2)
        weights = torch.softmax((self.attention_conv(cols) + neg).transpose(1, 2), dim=-1)
        attended = (values.transpose(1, 2) * weights).sum(-1)
        maxed = (values + neg).max(dim=1).values
        return torch.relu(self.dropout(self.dense(torch.cat([attended, maxed], dim=1))))


class _EsmPoolerHead(nn.Module):
    """EsmClassificationHead's layout: dense + tanh on the first token, out_proj."""

    def __init__(self, width, labels, dropout):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, labels)
        self.dropout = nn.Dropout(dropout)


class ProtlocMember(nn.Module):
    """One head: `classifier` (and `membrane_classifier`), named as protloc names them."""

    def __init__(self, task, width, encoder):
        super().__init__()
        self.kind, self.pool = task["head"], task["pool"]
        labels, dropout = len(task["labels"]), task["head_dropout"]
        hidden, features = task.get("head_hidden", 32), width
        self.dropout = nn.Dropout(dropout)
        if self.kind == "linear":
            self.classifier = nn.Linear(width, labels)
        elif self.kind == "mlp":
            self.classifier = _Mlp(width, hidden, labels, dropout)
            features = hidden
        elif self.kind == "light-attention":
            self.classifier = _LightAttention(width, hidden, labels, task.get("la_kernel", 9), dropout)
            features = hidden
        elif self.kind == "reference":
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, labels), nn.Tanh())
        elif self.kind == "pooler" and encoder == "esm":
            self.classifier = _EsmPoolerHead(width, labels, dropout)
        elif self.kind == "pooler":
            self.classifier = nn.Linear(width, labels)
        else:
            raise ValueError(f"unknown protloc head {self.kind!r}")
        if task.get("membrane", False):
            self.membrane_classifier = nn.Linear(features, 2)
        else:
            self.membrane_classifier = None

    def forward(self, hidden, residue_mask, pooler_output):
        if self.kind == "light-attention":
            x = (hidden * residue_mask.unsqueeze(2))[:, 1:]
            features = self.classifier.features(x, residue_mask[:, 1:])
            logits = self.classifier.out(features)
        elif self.kind == "reference":
            features = self.classifier[0](pooler_output)
            logits = self.classifier[2](self.classifier[1](features))
        elif self.kind == "pooler" and isinstance(self.classifier, _EsmPoolerHead):
            features = self.dropout(torch.tanh(self.classifier.dense(self.dropout(hidden[:, 0]))))
            logits = self.classifier.out_proj(features)
        elif self.kind == "pooler":
            features = self.dropout(pooler_output)
            logits = self.classifier(features)
        else:
            if self.pool == "cls":
                pooled = hidden[:, 0]
            else:
                m = residue_mask.unsqueeze(2)
                pooled = (hidden * m).sum(1) / m.sum(1)
            if self.kind == "mlp":
                features = self.classifier.features(pooled)
                logits = self.classifier.out(features)
            else:
                features = self.dropout(pooled)
                logits = self.classifier(features)
        membrane = None
        if self.membrane_classifier is not None:
            membrane = torch.softmax(self.membrane_classifier(features), dim=-1)[:, 1]
        return logits, membrane


class _ProtlocMixin:
    def _build_heads(self, config, encoder):
        task = config.protloc
        width = config.hidden_size
        members = task.get("ensemble", 1)
        if members == 1:
            member = ProtlocMember(task, width, encoder)
            # Registered under the top-level names protloc uses for a single model.
            self.classifier = member.classifier
            if member.membrane_classifier is not None:
                self.membrane_classifier = member.membrane_classifier
            # A plain list: the member's modules are registered above, under protloc's names
            # (train()/eval() reach the member through _classify).
            self._members = [member]
        else:
            self.ensemble = nn.ModuleList(ProtlocMember(task, width, encoder) for _ in range(members))
            self._members = list(self.ensemble)

    def _classify(self, encoder_out, input_ids, attention_mask, labels):
        hidden = encoder_out.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        special = torch.tensor(self.config.protloc_special_token_ids, device=input_ids.device)
        residue_mask = (attention_mask.bool() & ~torch.isin(input_ids, special)).to(hidden.dtype)
        pooler_output = getattr(encoder_out, "pooler_output", None)
        for m in self._members:
            m.train(self.training)
        outputs = [m(hidden, residue_mask, pooler_output) for m in self._members]
        logits = torch.stack([l for l, _ in outputs]).mean(0)
        multi = self.config.protloc.get("multi_label", False)
        probs = torch.stack([torch.sigmoid(l) if multi else torch.softmax(l, -1) for l, _ in outputs]).mean(0)
        membrane = None
        if outputs[0][1] is not None:
            membrane = torch.stack([m for _, m in outputs]).mean(0)
        loss = None
        if labels is not None:
            if multi:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        return ProtlocClassifierOutput(
            loss=loss, logits=logits, probabilities=probs, membrane_probability=membrane
        )


class ProtlocBertForSequenceClassification(_ProtlocMixin, BertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        pooled = config.protloc["head"] in ("reference", "pooler")
        self.bert = BertModel(config, add_pooling_layer=pooled)
        self._build_heads(config, "bert")
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self._classify(out, input_ids, attention_mask, labels)


class ProtlocEsmForSequenceClassification(_ProtlocMixin, EsmPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        pooled = config.protloc["head"] == "reference"
        self.esm = EsmModel(config, add_pooling_layer=pooled)
        self._build_heads(config, "esm")
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        out = self.esm(input_ids=input_ids, attention_mask=attention_mask)
        return self._classify(out, input_ids, attention_mask, labels)
