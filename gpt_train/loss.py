"""The training loss without the micro-batch's float32 logits (chunked_loss=True).

transformers' GPT-2 computes logits for every token of the micro-batch and upcasts them to
float32 for its cross-entropy; with the loss's gradient that is 12 bytes per token and vocabulary
entry (GPT-2 124M at 12 x 1024 tokens: ~7.4 GB of an eager step's ~14 GB). Here the LM head and
the cross-entropy run a chunk of tokens at a time, and each chunk's gradients (for the hidden
states and the head's weight) are computed in the same pass, as Liger's fused linear
cross-entropy does, so backward recomputes nothing: the same three matmuls as the plain loss,
with one chunk's logits alive at a time. The math is transformers' ForCausalLMLoss (targets of
-100 ignored; the sum over num_items_in_batch, else the mean): equal within float32 rounding.

It changes the model object's forward for training and evaluation only; the saved folder is a
plain GPT-2 and generation, given no labels, runs transformers' own forward.
"""
import types

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

IGNORE_INDEX = -100
CHUNK_LOGIT_BYTES = 256 * 2 ** 20  # one chunk's float32 logits: 1,024 tokens at GPT-2's 50,304 entries
MIN_CHUNK_TOKENS = 256  # small matmuls would underuse the device


def chunk_tokens(vocab_size):
    """Tokens per chunk: a power of two whose float32 logits fit CHUNK_LOGIT_BYTES (a character
    vocabulary's whole micro-batch is one chunk)."""
    tokens = max(CHUNK_LOGIT_BYTES // (4 * vocab_size), MIN_CHUNK_TOKENS)
    return 1 << (tokens.bit_length() - 1)


def use_chunked_loss(model):
    """Give this GPT2LMHeadModel the chunked loss (before Accelerate wraps it: autocast, DDP and
    torch.compile then wrap this forward as they would the plain one)."""
    model.forward = types.MethodType(_forward, model)
    return model


def _forward(self, input_ids=None, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
    if labels is None:  # generation and anything else that wants logits: transformers' forward
        return GPT2LMHeadModel.forward(self, input_ids=input_ids, **kwargs)
    hidden = self.transformer(input_ids=input_ids, **kwargs).last_hidden_state
    if shift_labels is None:  # transformers' shift: token t predicts label t + 1
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    loss = linear_cross_entropy(hidden.flatten(0, -2), self.lm_head.weight, shift_labels.flatten(),
                                num_items_in_batch, chunk_tokens(self.lm_head.weight.shape[0]))
    return CausalLMOutputWithCrossAttentions(loss=loss)


def linear_cross_entropy(hidden, weight, targets, num_items=None, chunk=1024):
    """cross_entropy(hidden @ weight.T, targets), summed over num_items or averaged over the
    targets that are not IGNORE_INDEX, a chunk of rows at a time. The matmuls run in autocast's
    dtype where autocast is on (as the plain LM head's would), the softmax in float32."""
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    count = (targets != IGNORE_INDEX).sum() if num_items is None else torch.as_tensor(num_items, device=hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, count, chunk, dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        total = sum(_chunk_loss(hidden[s:s + chunk].to(dtype), w, targets[s:s + chunk])[0]
                    for s in range(0, hidden.shape[0], chunk))
    return total / count


def _chunk_loss(h, w, t):
    """(summed loss, float32 logits, their logsumexp, valid rows, clamped targets) of one chunk."""
    logits = (h @ w.T).float()
    valid = t != IGNORE_INDEX
    t = t.clamp(min=0)  # ignored rows weigh 0 below; any index keeps gather in range
    lse = logits.logsumexp(-1)
    loss = ((lse - logits.gather(1, t[:, None]).squeeze(1)) * valid).sum()
    return loss, logits, lse, valid, t


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, count, chunk, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
            # LoRA freezes the head (GPT-2 ties it to the embedding): no gradient to compute for it
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(dtype)
                loss, logits, lse, valid, t = _chunk_loss(h, w, targets[s:s + chunk])
                total += loss
                # d(loss)/d(logits) = softmax - one_hot(target), for the rows that count, over
                # count; in the logits' own memory
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(len(t), device=t.device), t] -= 1
                grad = grad.mul_((valid / count)[:, None]).to(dtype)
                grad_hidden[s:s + chunk] = grad @ w
                if grad_weight is not None:
                    grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(weight_dtype)
        return (grad_hidden * grad_output).to(hidden_dtype), grad_weight, None, None, None, None
