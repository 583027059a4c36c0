"""BertForMaskedLM and BertForSequenceClassification: logits, loss and every parameter's gradient under the rule
against the same model on torch.nn's layers in float32 and, as the float64 oracle, torch.nn's layers with the
heads composed in this file from their definitions; mask_tokens' 15% / 80-10-10 statistics; loading the
pre-trained encoder into the classifier; bad input."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_rule

from seqkern.models import BertEncoder, BertForMaskedLM, BertForSequenceClassification, mask_tokens
from seqkern.models.bert import IGNORE_INDEX

VOCAB, MASK_ID = 53, 4
CONFIG = dict(vocab_size=VOCAB, d_model=48, nhead=4, num_layers=2, dim_feedforward=96, max_len=32, dropout=0.0)


def build(head_cls, layer_cls=None, **options):
    torch.manual_seed(0)
    return head_cls(**CONFIG, layer_cls=layer_cls, **options)


def data(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (3, 11), generator=gen)
    attention_mask = (torch.arange(11) < torch.tensor([11, 7, 2])[:, None]).long()
    segments = torch.randint(0, 2, (3, 11), generator=gen)
    corrupted, labels = mask_tokens(input_ids, MASK_ID, VOCAB, special_tokens_mask=attention_mask == 0,
                                    mlm_probability=0.4, generator=gen)
    return corrupted, attention_mask, segments, labels, torch.tensor([0, 2, 1])


def composed_encoder(model, params: dict):
    """BertEncoder on torch.nn.TransformerEncoderLayer, running on the float64 parameters `params`."""
    encoder = BertEncoder(**CONFIG, layer_cls=torch.nn.TransformerEncoderLayer).double()
    weights = {k.removeprefix("bert."): v for k, v in params.items() if k.startswith("bert.")}
    return lambda *args: torch.func.functional_call(encoder, weights, args)


def composed_masked_lm(model, params, ids, mask, segments):
    """logits = LayerNorm(GELU(W h + b)) @ E^T + bias, with E the token embeddings (the tied decoder)."""
    sequence, _ = composed_encoder(model, params)(ids, mask, segments)
    hidden = F.gelu(F.linear(sequence, params["transform.weight"], params["transform.bias"]))
    hidden = F.layer_norm(hidden, hidden.shape[-1:], params["transform_norm.weight"], params["transform_norm.bias"],
                          eps=model.transform_norm.eps)
    return F.linear(hidden, params["bert.word_embeddings.weight"], params["decoder_bias"])


def composed_classifier(model, params, ids, mask, segments):
    _, pooled = composed_encoder(model, params)(ids, mask, segments)
    return F.linear(pooled, params["classifier.weight"], params["classifier.bias"])


def results(logits, labels, parameters: dict, keep=None) -> dict:
    """Logits (padded rows zeroed: unspecified), the loss and the gradient of the loss to every parameter."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    # The masked LM does not use the pooler: its gradients are zeros (materialized), for every contender alike.
    grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True, materialize_grads=True)
    shown = logits if keep is None else logits * keep
    return {"logits": shown, "loss": loss, **{f"grad_{name}": g for name, g in zip(parameters, grads)}}


@pytest.mark.parametrize("head", ["masked_lm", "classifier"])
def test_head_follows_the_rule(head):
    head_cls = BertForMaskedLM if head == "masked_lm" else BertForSequenceClassification
    options = {} if head == "masked_lm" else {"num_labels": 3}
    ours = build(head_cls, **options)
    theirs = build(head_cls, layer_cls=torch.nn.TransformerEncoderLayer, **options)
    theirs.load_state_dict(ours.state_dict())
    ids, mask, segments, token_labels, row_labels = data()
    labels = token_labels if head == "masked_lm" else row_labels
    keep = mask.bool()[..., None].double() if head == "masked_lm" else None

    params64 = {name: p.detach().double().requires_grad_() for name, p in ours.named_parameters()}
    compose = composed_masked_lm if head == "masked_lm" else composed_classifier
    expected = results(compose(ours, params64, ids, mask, segments), labels, params64, keep)
    got = []
    for model in (ours, theirs):
        out = model(ids, mask, segments, labels=labels)
        step = results(out.logits, labels, dict(model.named_parameters()), None if keep is None else keep.float())
        torch.testing.assert_close(out.loss, step["loss"], rtol=0, atol=0)
        got.append(step)
    assert_all_rule(*got, expected)


def test_masked_lm_decoder_is_tied_to_the_token_embeddings():
    model = build(BertForMaskedLM)
    assert not any("decoder.weight" in key for key in model.state_dict())
    ids, mask, segments, labels, _ = data()
    with torch.no_grad():
        model.bert.word_embeddings.weight[MASK_ID] += 1.0
    before = model(ids, mask, segments).logits
    assert before.shape == (3, 11, VOCAB)
    assert model(ids, mask, segments, labels=labels).loss.ndim == 0


def test_mask_tokens_selects_fifteen_percent_and_splits_80_10_10():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30000, (400, 500), generator=gen)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    corrupted, labels = mask_tokens(ids, MASK_ID, 30000, special_tokens_mask=special, generator=gen)
    selected = labels != IGNORE_INDEX
    assert not selected[special].any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(corrupted[~selected], ids[~selected])
    fraction = selected.sum().item() / (~special).sum().item()
    assert abs(fraction - 0.15) < 0.003
    masked = (corrupted[selected] == MASK_ID).float().mean().item()
    kept = (corrupted[selected] == ids[selected]).float().mean().item()
    randomized = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(randomized - 0.1) < 0.01


def test_mask_tokens_is_reproducible_from_the_seed():
    ids = torch.randint(5, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    first = mask_tokens(ids, MASK_ID, VOCAB)
    torch.manual_seed(7)
    second = mask_tokens(ids, MASK_ID, VOCAB)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_pretrained_encoder_loads_into_the_classifier():
    masked_lm = build(BertForMaskedLM)
    classifier = build(BertForSequenceClassification, num_labels=2)
    classifier.bert.load_state_dict(masked_lm.bert.state_dict())
    incompatible = classifier.load_state_dict(masked_lm.state_dict(), strict=False)
    assert set(incompatible.missing_keys) == {"classifier.weight", "classifier.bias"}
    assert set(incompatible.unexpected_keys) == {"transform.weight", "transform.bias", "transform_norm.weight",
                                                 "transform_norm.bias", "decoder_bias"}
    ids, mask, segments, _, _ = data()
    torch.testing.assert_close(classifier.bert(ids, mask, segments)[0], masked_lm.bert(ids, mask, segments)[0])


def test_bad_input():
    model = build(BertForSequenceClassification, num_labels=3)
    ids, mask, segments, _, _ = data()
    with pytest.raises(ValueError, match="labels"):
        model(ids, mask, segments, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(ids, mask, segments, labels=torch.zeros(3))
    with pytest.raises(ValueError, match="num_labels"):
        build(BertForSequenceClassification, num_labels=0)
    with pytest.raises(ValueError, match="mlm_probability"):
        mask_tokens(ids, MASK_ID, VOCAB, mlm_probability=1.5)
    with pytest.raises(ValueError, match="mask_token_id"):
        mask_tokens(ids, VOCAB, VOCAB)
    with pytest.raises(ValueError, match="special_tokens_mask"):
        mask_tokens(ids, MASK_ID, VOCAB, special_tokens_mask=mask)
