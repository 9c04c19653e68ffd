"""Solutions the grading tests were tried on: for every assignment, plausible wrong ones (each must
lose points) and correct ones written differently from the reference (each must get full points).
tests/test_assignments.py grades them all. Each entry is a list of bodies, one per marked region of
the assignment in file order (None keeps the reference's), written without the region's indentation.
"""

# ----------------------------------------------------------------------------------------------
# Wrong: each must fail at least one grading test of its assignment

WRONG = {
    "rmsnorm": {
        "no eps": ["x32 = x.float()\nreturn self.weight * (x32 / x32.pow(2).mean(-1, keepdim=True).sqrt()).to(x.dtype)"],
        "eps outside the square root": [
            "x32 = x.float()\n"
            "return self.weight * (x32 / (x32.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)).to(x.dtype)"],
        "computed in the input dtype": ["return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)"],
        "sum instead of mean": [
            "x32 = x.float()\nreturn self.weight * (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + self.eps)).to(x.dtype)"],
        "no weight": ["x32 = x.float()\nreturn (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)"],
        "never cast back (fp32 out)": [
            "x32 = x.float()\nreturn self.weight.float() * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)"],
    },
    "rope": {
        "rotation returns fp32 for bf16 input": [None, (
            "x1, x2 = x.chunk(2, dim=-1)\n"
            "return x * cos + torch.cat([-x2, x1], dim=-1) * sin")],
        "interleaved pairs (Meta's layout)": [None, (
            "rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)\n"
            "c, s = cos[..., ::2].repeat_interleave(2, -1), sin[..., ::2].repeat_interleave(2, -1)\n"
            "return (x * c.to(x.dtype) + rotated * s.to(x.dtype))")],
        "rotation the wrong way": [None, (
            "x1, x2 = x.chunk(2, dim=-1)\n"
            "return x * cos.to(x.dtype) + torch.cat([x2, -x1], dim=-1) * sin.to(x.dtype)")],
        "tables interleaved, not repeated": [(
            "angles = positions.float()[:, None] * inv_freq[None, :]\n"
            "angles = angles.repeat_interleave(2, dim=-1)\n"
            "return angles.cos(), angles.sin()"), None],
        "tables in float64": [(
            "angles = positions.double()[:, None] * inv_freq.double()[None, :]\n"
            "angles = torch.cat([angles, angles], dim=-1)\n"
            "return angles.cos(), angles.sin()"), None],
    },
    "maxsim": {
        "mask by multiplying": [(
            "if D.dim() == 3:\n"
            "    sim = torch.einsum('qid,njd->qnij', Q, D) * d_mask[None, :, None, :]\n"
            "else:\n"
            "    sim = torch.einsum('qid,qnjd->qnij', Q, D) * d_mask[:, :, None, :]\n"
            "return (sim.amax(-1) * q_mask[:, None, :]).float().sum(-1)")],
        "masked embeddings zeroed": [(
            "D = D * d_mask[..., None]\n"
            "eq = 'qid,njd->qnij' if D.dim() == 3 else 'qid,qnjd->qnij'\n"
            "return (torch.einsum(eq, Q, D).amax(-1) * q_mask[:, None, :]).float().sum(-1)")],
        "masked query tokens counted": [(
            "eq, dm = ('qid,njd->qnij', d_mask[None, :, None, :]) if D.dim() == 3 else ('qid,qnjd->qnij', d_mask[:, :, None, :])\n"
            "return torch.einsum(eq, Q, D).masked_fill(~dm, float('-inf')).amax(-1).float().sum(-1)")],
        "mean over query tokens": [(
            "eq, dm = ('qid,njd->qnij', d_mask[None, :, None, :]) if D.dim() == 3 else ('qid,qnjd->qnij', d_mask[:, :, None, :])\n"
            "best = torch.einsum(eq, Q, D).masked_fill(~dm, float('-inf')).amax(-1).float()\n"
            "return torch.where(q_mask[:, None, :], best, 0.0).sum(-1) / q_mask.sum(-1, keepdim=True)")],
        "an empty document scores 0": [(
            "eq, dm = ('qid,njd->qnij', d_mask[None, :, None, :]) if D.dim() == 3 else ('qid,qnjd->qnij', d_mask[:, :, None, :])\n"
            "best = torch.einsum(eq, Q, D).masked_fill(~dm, float('-inf')).amax(-1).float()\n"
            "best = torch.where(best.isinf(), 0.0, best)   # guard against -inf\n"
            "return torch.where(q_mask[:, None, :], best, 0.0).sum(-1)")],
        "summed in the embeddings' dtype": [(
            "eq, dm = ('qid,njd->qnij', d_mask[None, :, None, :]) if D.dim() == 3 else ('qid,qnjd->qnij', d_mask[:, :, None, :])\n"
            "best = torch.einsum(eq, Q, D).masked_fill(~dm, float('-inf')).amax(-1)\n"
            "return torch.where(q_mask[:, None, :], best, 0.0).sum(-1)")],
        "max over query tokens, sum over document tokens": [(
            "eq, dm = ('qid,njd->qnij', d_mask[None, :, None, :]) if D.dim() == 3 else ('qid,qnjd->qnij', d_mask[:, :, None, :])\n"
            "sim = torch.einsum(eq, Q, D).masked_fill(~q_mask[:, None, :, None], float('-inf')).amax(-2).float()\n"
            "return torch.where(dm[..., 0, :], sim, 0.0).sum(-1)")],
    },
    "masks": {
        "documents padded to doc_maxlen": [None, (
            "rows = self._ids(texts, self.d_marker, self.cfg.doc_maxlen)\n"
            "L = self.cfg.doc_maxlen\n"
            "ids = torch.tensor([r + [self.pad] * (L - len(r)) for r in rows])\n"
            "attend = ids != self.pad\n"
            "skip = torch.tensor(self.punctuation if self.cfg.mask_punctuation else [], dtype=torch.long)\n"
            "return ids, attend, attend & ~torch.isin(ids, skip)")],
        "queries padded with [PAD]": [(
            "L = self.cfg.query_maxlen\n"
            "rows = self._ids(texts, self.q_marker, L)\n"
            "ids = torch.tensor([r + [self.pad] * (L - len(r)) for r in rows])\n"
            "return ids, ids != self.pad"), None],
        "masks as 0/1 integers": [(
            "L = self.cfg.query_maxlen\n"
            "rows = self._ids(texts, self.q_marker, L)\n"
            "ids = torch.tensor([r + [self.mask] * (L - len(r)) for r in rows])\n"
            "return ids, torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])"), None],
        "queries attend to their [MASK] padding": [(
            "L = self.cfg.query_maxlen\n"
            "rows = self._ids(texts, self.q_marker, L)\n"
            "ids = torch.tensor([r + [self.mask] * (L - len(r)) for r in rows])\n"
            "return ids, torch.ones_like(ids, dtype=torch.bool)"), None],
        "punctuation scored": [None, (
            "rows = self._ids(texts, self.d_marker, self.cfg.doc_maxlen)\n"
            "L = max(len(r) for r in rows)\n"
            "ids = torch.tensor([r + [self.pad] * (L - len(r)) for r in rows])\n"
            "attend = ids != self.pad\n"
            "return ids, attend, attend.clone()")],
        "queries padded to the longest": [(
            "rows = self._ids(texts, self.q_marker, self.cfg.query_maxlen)\n"
            "L = max(len(r) for r in rows)\n"
            "ids = torch.tensor([r + [self.mask] * (L - len(r)) for r in rows])\n"
            "return ids, torch.tensor([[True] * len(r) + [False] * (L - len(r)) for r in rows])"), None],
    },
    "sampling": {
        "min-max over the whole batch": [(
            "s = scores.detach().float()\n"
            "if minmax_scale:\n"
            "    s = 2 * (s - s.min()) / (s.max() - s.min()).clamp_min(1e-12) - 1\n"
            "log_p = torch.log_softmax(s / tau, dim=1)\n"
            "device = generator.device if generator is not None else s.device\n"
            "noise = torch.empty(s.shape, device=device).exponential_(generator=generator).to(s.device)\n"
            "return (log_p - noise.log()).topk(m, dim=1).indices")],
        "tau forgotten after min-max": [(
            "s = scores.detach().float()\n"
            "if minmax_scale:\n"
            "    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)\n"
            "    log_p = torch.log_softmax(2 * (s - lo) / (hi - lo).clamp_min(1e-12) - 1, dim=1)\n"
            "else:\n"
            "    log_p = torch.log_softmax(s / tau, dim=1)\n"
            "device = generator.device if generator is not None else s.device\n"
            "noise = torch.empty(s.shape, device=device).exponential_(generator=generator).to(s.device)\n"
            "return (log_p - noise.log()).topk(m, dim=1).indices")],
        "torch.multinomial on the softmax": [(
            "s = scores.detach().float()\n"
            "if minmax_scale:\n"
            "    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)\n"
            "    s = 2 * (s - lo) / (hi - lo).clamp_min(1e-12) - 1\n"
            "return torch.multinomial(torch.softmax(s / tau, dim=1), m, replacement=False, generator=generator)")],
        "the top m, no sampling": ["return scores.detach().topk(m, dim=1).indices"],
        "noise drawn on the scores' device": [(
            "s = scores.detach().float()\n"
            "if minmax_scale:\n"
            "    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)\n"
            "    s = 2 * (s - lo) / (hi - lo).clamp_min(1e-12) - 1\n"
            "noise = torch.empty_like(s).exponential_(generator=generator)\n"
            "return (torch.log_softmax(s / tau, dim=1) - noise.log()).topk(m, dim=1).indices")],
        "Gumbel noise with the wrong sign": [(
            "s = scores.detach().float()\n"
            "if minmax_scale:\n"
            "    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)\n"
            "    s = 2 * (s - lo) / (hi - lo).clamp_min(1e-12) - 1\n"
            "device = generator.device if generator is not None else s.device\n"
            "noise = torch.empty(s.shape, device=device).exponential_(generator=generator).to(s.device)\n"
            "return (torch.log_softmax(s / tau, dim=1) + noise.log()).topk(m, dim=1).indices")],
        "softmax over the batch": [(
            "s = scores.detach().float()\n"
            "device = generator.device if generator is not None else s.device\n"
            "noise = torch.empty(s.shape, device=device).exponential_(generator=generator).to(s.device)\n"
            "return (torch.log_softmax(s / tau, dim=0) - noise.log()).topk(m, dim=1).indices")],
    },
    "rank_loss": {
        "ties counted in the mean": [(
            "diff = (scores[:, :, None] - scores[:, None, :]) / tau_rank\n"
            "l = llm_losses.detach()\n"
            "target = (l[:, :, None] < l[:, None, :]).float()\n"
            "upper = torch.ones_like(diff, dtype=torch.bool).triu(1)\n"
            "return F.binary_cross_entropy_with_logits(diff, target, reduction='none')[upper].mean()")],
        "mean per question, then over questions": [(
            "diff = (scores[:, :, None] - scores[:, None, :]) / tau_rank\n"
            "l = llm_losses.detach()\n"
            "target = (l[:, :, None] < l[:, None, :]).float()\n"
            "pairs = torch.ones_like(diff, dtype=torch.bool).triu(1) & ((l[:, :, None] - l[:, None, :]).abs() > tie_margin)\n"
            "bce = F.binary_cross_entropy_with_logits(diff, target, reduction='none') * pairs\n"
            "return (bce.sum((1, 2)) / pairs.sum((1, 2)).clamp_min(1)).mean()")],
        "the target reversed": [(
            "diff = (scores[:, :, None] - scores[:, None, :]) / tau_rank\n"
            "l = llm_losses.detach()\n"
            "target = (l[:, :, None] > l[:, None, :]).float()\n"
            "pairs = torch.ones_like(diff, dtype=torch.bool).triu(1) & ((l[:, :, None] - l[:, None, :]).abs() > tie_margin)\n"
            "if not pairs.any():\n"
            "    return scores.sum() * 0.0\n"
            "return F.binary_cross_entropy_with_logits(diff, target, reduction='none')[pairs].mean()")],
        "tau_rank forgotten": [(
            "diff = scores[:, :, None] - scores[:, None, :]\n"
            "l = llm_losses.detach()\n"
            "target = (l[:, :, None] < l[:, None, :]).float()\n"
            "pairs = torch.ones_like(diff, dtype=torch.bool).triu(1) & ((l[:, :, None] - l[:, None, :]).abs() > tie_margin)\n"
            "if not pairs.any():\n"
            "    return scores.sum() * 0.0\n"
            "return F.binary_cross_entropy_with_logits(diff, target, reduction='none')[pairs].mean()")],
        "tie_margin ignored": [(
            "diff = (scores[:, :, None] - scores[:, None, :]) / tau_rank\n"
            "l = llm_losses.detach()\n"
            "target = (l[:, :, None] < l[:, None, :]).float()\n"
            "pairs = torch.ones_like(diff, dtype=torch.bool).triu(1) & (l[:, :, None] != l[:, None, :])\n"
            "if not pairs.any():\n"
            "    return scores.sum() * 0.0\n"
            "return F.binary_cross_entropy_with_logits(diff, target, reduction='none')[pairs].mean()")],
        "only ties: a constant 0 without the graph": [(
            "diff = (scores[:, :, None] - scores[:, None, :]) / tau_rank\n"
            "l = llm_losses.detach()\n"
            "target = (l[:, :, None] < l[:, None, :]).float()\n"
            "pairs = torch.ones_like(diff, dtype=torch.bool).triu(1) & ((l[:, :, None] - l[:, None, :]).abs() > tie_margin)\n"
            "if not pairs.any():\n"
            "    return torch.tensor(0.0)\n"
            "return F.binary_cross_entropy_with_logits(diff, target, reduction='none')[pairs].mean()")],
        "only ties: NaN": [(
            "diff = (scores[:, :, None] - scores[:, None, :]) / tau_rank\n"
            "l = llm_losses.detach()\n"
            "target = (l[:, :, None] < l[:, None, :]).float()\n"
            "pairs = torch.ones_like(diff, dtype=torch.bool).triu(1) & ((l[:, :, None] - l[:, None, :]).abs() > tie_margin)\n"
            "return F.binary_cross_entropy_with_logits(diff, target, reduction='none')[pairs].mean()")],
    },
    "doc_losses": {
        "rows in column order": [(
            "rows = [tokenize_example(self.tok, [batch[b].candidates[picked[b, j]]], batch[b].question,\n"
            "                         batch[b].options, batch[b].target, self.cfg.max_doc_tokens)\n"
            "        for j in range(picked.size(1)) for b in range(picked.size(0))]\n"
            "return self.llm_losses(rows).view(picked.shape)")],
        "candidate j instead of picked[b, j]": [(
            "rows = [tokenize_example(self.tok, [ex.candidates[j]], ex.question, ex.options, ex.target,\n"
            "                         self.cfg.max_doc_tokens) for ex in batch for j in range(picked.size(1))]\n"
            "return self.llm_losses(rows).view(picked.shape)")],
        "max_doc_tokens left at its default": [(
            "rows = [tokenize_example(self.tok, [ex.candidates[i]], ex.question, ex.options, ex.target, 180)\n"
            "        for ex, p in zip(batch, picked.tolist()) for i in p]\n"
            "return self.llm_losses(rows).view(picked.shape)")],
        "the LLM called directly (no eval mode, no budget)": [(
            "rows = [tokenize_example(self.tok, [ex.candidates[i]], ex.question, ex.options, ex.target,\n"
            "                         self.cfg.max_doc_tokens) for ex, p in zip(batch, picked.tolist()) for i in p]\n"
            "tokens, labels = pad_batch(rows, self.pad_id, self.llm.embed_tokens.weight.device)\n"
            "return self.llm.sequence_loss(tokens, labels).view(picked.shape)")],
        "one llm_losses call per row": [(
            "return torch.stack([torch.cat([self.llm_losses([tokenize_example(\n"
            "    self.tok, [ex.candidates[i]], ex.question, ex.options, ex.target, self.cfg.max_doc_tokens)])\n"
            "    for i in p]) for ex, p in zip(batch, picked.tolist())])")],
        "every sampled document in one prompt": [(
            "rows = [tokenize_example(self.tok, [ex.candidates[i] for i in p], ex.question, ex.options, ex.target,\n"
            "                         self.cfg.max_doc_tokens) for ex, p in zip(batch, picked.tolist())]\n"
            "return self.llm_losses(rows)[:, None].expand(picked.shape)")],
    },
    "s2attn_mask": {
        "shifted groups wrap around (torch.roll)": [(
            "i = torch.arange(T, device=device)\n"
            "causal = i[None, :] <= i[:, None]\n"
            "g0 = i // group_size\n"
            "g1 = ((i + group_size // 2) % T) // group_size if group_size < T else g0\n"
            "m0, m1 = causal & (g0[:, None] == g0[None, :]), causal & (g1[:, None] == g1[None, :])\n"
            "return torch.where(shifted_heads(num_heads).to(causal.device)[:, None, None], m1, m0)")],
        "the first half of the heads shifted": [(
            "i = torch.arange(T, device=device)\n"
            "causal = i[None, :] <= i[:, None]\n"
            "m = [causal & (g[:, None] == g[None, :]) for g in (group_ids(T, group_size, s, device) for s in (False, True))]\n"
            "return torch.where(~shifted_heads(num_heads).to(causal.device)[:, None, None], m[1], m[0])")],
        "not causal within a group": [(
            "m = [g[:, None] == g[None, :] for g in (group_ids(T, group_size, s, device) for s in (False, True))]\n"
            "return torch.where(shifted_heads(num_heads).to(m[0].device)[:, None, None], m[1], m[0])")],
        "shifted even when G >= T": [(
            "i = torch.arange(T, device=device)\n"
            "causal = i[None, :] <= i[:, None]\n"
            "m = [causal & (g[:, None] == g[None, :]) for g in (i // group_size, (i + group_size // 2) // group_size)]\n"
            "return torch.where(shifted_heads(num_heads).to(causal.device)[:, None, None], m[1], m[0])")],
        "a 0/1 mask": [(
            "i = torch.arange(T, device=device)\n"
            "causal = i[None, :] <= i[:, None]\n"
            "m = [causal & (g[:, None] == g[None, :]) for g in (group_ids(T, group_size, s, device) for s in (False, True))]\n"
            "return torch.where(shifted_heads(num_heads).to(causal.device)[:, None, None], m[1], m[0]).int()")],
    },
    "online_softmax": {
        "p not rounded before tl.dot": [(
            "m_new = tl.maximum(m_i, tl.max(s, 1))\n"
            "alpha = tl.exp2(m_i - m_new)\n"
            "p = tl.exp2(s - m_new[:, None])\n"
            "l_i = l_i * alpha + tl.sum(p, 1)\n"
            "acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)\n"
            "return acc, m_new, l_i")],
        "acc not rescaled": [(
            "m_new = tl.maximum(m_i, tl.max(s, 1))\n"
            "alpha = tl.exp2(m_i - m_new)\n"
            "p = tl.exp2(s - m_new[:, None])\n"
            "l_i = l_i * alpha + tl.sum(p, 1)\n"
            "acc = tl.dot(_round_to(p, DTYPE, INTERPRETED), v, acc, input_precision=PRECISION)\n"
            "return acc, m_new, l_i")],
        "l_i not rescaled": [(
            "m_new = tl.maximum(m_i, tl.max(s, 1))\n"
            "alpha = tl.exp2(m_i - m_new)\n"
            "p = tl.exp2(s - m_new[:, None])\n"
            "l_i = l_i + tl.sum(p, 1)\n"
            "acc = tl.dot(_round_to(p, DTYPE, INTERPRETED), v, acc * alpha[:, None], input_precision=PRECISION)\n"
            "return acc, m_new, l_i")],
        "e^x instead of 2^x (scores are in log2 units)": [(
            "m_new = tl.maximum(m_i, tl.max(s, 1))\n"
            "alpha = tl.exp(m_i - m_new)\n"
            "p = tl.exp(s - m_new[:, None])\n"
            "l_i = l_i * alpha + tl.sum(p, 1)\n"
            "acc = tl.dot(_round_to(p, DTYPE, INTERPRETED), v, acc * alpha[:, None], input_precision=PRECISION)\n"
            "return acc, m_new, l_i")],
        "the old max returned": [(
            "m_new = tl.maximum(m_i, tl.max(s, 1))\n"
            "alpha = tl.exp2(m_i - m_new)\n"
            "p = tl.exp2(s - m_new[:, None])\n"
            "l_i = l_i * alpha + tl.sum(p, 1)\n"
            "acc = tl.dot(_round_to(p, DTYPE, INTERPRETED), v, acc * alpha[:, None], input_precision=PRECISION)\n"
            "return acc, m_i, l_i")],
        "p always rounded to bf16": [(
            "m_new = tl.maximum(m_i, tl.max(s, 1))\n"
            "alpha = tl.exp2(m_i - m_new)\n"
            "p = tl.exp2(s - m_new[:, None])\n"
            "l_i = l_i * alpha + tl.sum(p, 1)\n"
            "acc = tl.dot(_round_to(p, tl.bfloat16, INTERPRETED), v, acc * alpha[:, None], input_precision=PRECISION)\n"
            "return acc, m_new, l_i")],
    },
    "lr_schedule": {
        "the cosine rises again after the last step": [(
            "if step < cfg.warmup_steps:\n"
            "    return (step + 1) / cfg.warmup_steps\n"
            "progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)\n"
            "return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))")],
        "warmup starts at 0": [(
            "if step < cfg.warmup_steps:\n"
            "    return step / cfg.warmup_steps\n"
            "progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)\n"
            "return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))")],
        "decay over all steps, warmup included": [(
            "if step < cfg.warmup_steps:\n"
            "    return (step + 1) / cfg.warmup_steps\n"
            "progress = step / cfg.steps\n"
            "return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))")],
        "decay to 0, min_lr_ratio ignored": [(
            "if step < cfg.warmup_steps:\n"
            "    return (step + 1) / cfg.warmup_steps\n"
            "progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)\n"
            "return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))")],
        "divides by zero when warmup_steps == steps": [(
            "if step < cfg.warmup_steps:\n"
            "    return (step + 1) / cfg.warmup_steps\n"
            "progress = min(1.0, (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps))\n"
            "return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))")],
    },
}

# ----------------------------------------------------------------------------------------------
# Correct, and written differently from the reference: each must get every point

CORRECT = {
    "rmsnorm": {
        "F.rms_norm in fp32": ["return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)"],
        "sum of squares over the width": [
            "x32 = x.float()\nscale = (x32.square().sum(-1, keepdim=True) / x.size(-1) + self.eps).sqrt()\n"
            "return self.weight * (x32 / scale).to(x.dtype)"],
    },
    "rope": {
        "outer product, halves rotated separately": [(
            "angles = torch.outer(positions.to(torch.float32), inv_freq.to(positions.device).float())\n"
            "return angles.repeat(1, 2).cos(), angles.repeat(1, 2).sin()"), (
            "half = x.size(-1) // 2\n"
            "c, s = cos[:, :half], sin[:, :half]\n"
            "x1, x2 = x[..., :half].float(), x[..., half:].float()\n"
            "return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)")],
        "complex multiplication": [None, (
            "half = x.size(-1) // 2\n"
            "z = torch.complex(x[..., :half].float(), x[..., half:].float())\n"
            "z = z * torch.polar(torch.ones_like(cos[:, :half]), torch.atan2(sin[:, :half], cos[:, :half]))\n"
            "return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)")],
    },
    "maxsim": {
        "a large finite fill, 3-d D as candidate lists": [(
            "if D.dim() == 3:\n"
            "    D, d_mask = D.expand(Q.size(0), *D.shape), d_mask.expand(Q.size(0), *d_mask.shape)\n"
            "sim = torch.einsum('qid,qnjd->qnij', Q.float(), D.float())\n"
            "best = sim.masked_fill(~d_mask[:, :, None, :], -1e9).amax(-1)\n"
            "return (best * q_mask[:, None, :]).sum(-1)")],
        "matmul and where": [(
            "Df = D.float() if D.dim() == 4 else D.float()[None]\n"
            "dm = d_mask if d_mask.dim() == 3 else d_mask[None]\n"
            "sim = Q.float()[:, None] @ Df.transpose(-1, -2)\n"
            "best = torch.where(dm[:, :, None, :], sim, float('-inf')).max(dim=-1).values\n"
            "return best.masked_fill(~q_mask[:, None, :], 0.0).sum(-1)")],
    },
    "masks": {
        "filled tensors, punctuation removed one by one": [(
            "L = self.cfg.query_maxlen\n"
            "rows = self._ids(texts, self.q_marker, L)\n"
            "ids = torch.full((len(rows), L), self.mask)\n"
            "attend = torch.zeros(len(rows), L, dtype=torch.bool)\n"
            "for n, r in enumerate(rows):\n"
            "    ids[n, :len(r)], attend[n, :len(r)] = torch.tensor(r), True\n"
            "return ids, attend"), (
            "rows = self._ids(texts, self.d_marker, self.cfg.doc_maxlen)\n"
            "ids = torch.full((len(rows), max(map(len, rows))), self.pad)\n"
            "for n, r in enumerate(rows):\n"
            "    ids[n, :len(r)] = torch.tensor(r)\n"
            "attend = torch.arange(ids.size(1))[None, :] < torch.tensor([len(r) for r in rows])[:, None]\n"
            "score = attend.clone()\n"
            "for p in (self.punctuation if self.cfg.mask_punctuation else []):\n"
            "    score &= ids != p\n"
            "return ids, attend, score")],
    },
    "sampling": {
        "Gumbel-max keys from uniform noise": [(
            "s = scores.detach().float()\n"
            "if minmax_scale:\n"
            "    lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values\n"
            "    s = (s - lo) / (hi - lo).clamp_min(1e-12) * 2 - 1\n"
            "device = generator.device if generator is not None else s.device\n"
            "u = torch.rand(s.shape, device=device, generator=generator).clamp_min(1e-20).to(s.device)\n"
            "return (s / tau - torch.log(-torch.log(u))).argsort(dim=1, descending=True)[:, :m]")],
        "inverse CDF, one draw at a time": [(
            "s = scores.detach().float()\n"
            "if minmax_scale:\n"
            "    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)\n"
            "    s = 2 * (s - lo) / (hi - lo).clamp_min(1e-12) - 1\n"
            "logits, picks = s / tau, []\n"
            "device = generator.device if generator is not None else s.device\n"
            "for _ in range(m):\n"
            "    cdf = torch.softmax(logits, dim=1).cumsum(dim=1)                  # renormalized over what is left\n"
            "    u = torch.rand(s.size(0), 1, device=device, generator=generator).to(s.device)\n"
            "    pick = (cdf < u * cdf[:, -1:]).sum(1, keepdim=True).clamp_max(s.size(1) - 1)\n"
            "    pick = torch.where(logits.gather(1, pick) == float('-inf'), logits.argmax(1, keepdim=True), pick)\n"
            "    picks.append(pick)\n"
            "    logits = logits.scatter(1, pick, float('-inf'))\n"
            "return torch.cat(picks, dim=1)")],
    },
    "rank_loss": {
        "ordered pairs both ways, logsigmoid": [(
            "d = (scores[:, :, None] - scores[:, None, :]) / tau_rank\n"
            "l = llm_losses.detach()\n"
            "better = l[:, :, None] < l[:, None, :]\n"
            "counted = (l[:, :, None] - l[:, None, :]).abs() > tie_margin\n"
            "if counted.sum() == 0:\n"
            "    return (scores * 0).sum()\n"
            "return -torch.where(better, F.logsigmoid(d), F.logsigmoid(-d))[counted].mean()")],
        "loops over pairs": [(
            "terms = []\n"
            "for b in range(scores.size(0)):\n"
            "    for i in range(scores.size(1)):\n"
            "        for j in range(i + 1, scores.size(1)):\n"
            "            if abs(llm_losses[b, i] - llm_losses[b, j]) > tie_margin:\n"
            "                sign = 1.0 if llm_losses[b, i] < llm_losses[b, j] else -1.0\n"
            "                terms.append(-F.logsigmoid(sign * (scores[b, i] - scores[b, j]) / tau_rank))\n"
            "return torch.stack(terms).mean() if terms else scores.sum() * 0.0")],
    },
    "doc_losses": {
        "explicit loops, reshape": [(
            "B, m = picked.shape\n"
            "rows = []\n"
            "for b in range(B):\n"
            "    for j in range(m):\n"
            "        ex = batch[b]\n"
            "        doc = ex.candidates[int(picked[b, j])]\n"
            "        rows.append(tokenize_example(self.tok, [doc], ex.question, ex.options, ex.target,\n"
            "                                     self.cfg.max_doc_tokens))\n"
            "return self.llm_losses(rows).reshape(B, m)")],
    },
    "s2attn_mask": {
        "loops over heads": [(
            "i = torch.arange(T, device=device)\n"
            "heads = []\n"
            "for shifted in shifted_heads(num_heads).tolist():\n"
            "    g = group_ids(T, group_size, shifted, device)\n"
            "    heads.append((i[:, None] >= i[None, :]) & (g[:, None] == g[None, :]))\n"
            "return torch.stack(heads)")],
    },
    "online_softmax": {
        "rescale, then add the block's dot": [(
            "m_new = tl.maximum(m_i, tl.max(s, 1))\n"
            "p = tl.exp2(s - m_new[:, None])\n"
            "p_in = _round_to(p, DTYPE, INTERPRETED)\n"
            "acc = acc * tl.exp2(m_i - m_new)[:, None] + tl.dot(p_in, v, input_precision=PRECISION)\n"
            "return acc, m_new, l_i * tl.exp2(m_i - m_new) + tl.sum(p, 1)")],
    },
    "lr_schedule": {
        "piecewise, the floor first": [(
            "if step >= cfg.steps and cfg.steps > cfg.warmup_steps:\n"
            "    return cfg.min_lr_ratio\n"
            "if step < cfg.warmup_steps:\n"
            "    return (step + 1) / cfg.warmup_steps\n"
            "t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)\n"
            "cosine = (1 + math.cos(math.pi * t)) / 2\n"
            "return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine")],
    },
}

# The harder s2attn_mask (make_assignment.py --harder): bodies for shifted_heads, group_ids, s2_mask.
HARDER_WRONG = {
    "group_ids shifted even when G >= T": [None, "return (torch.arange(T, device=device) + (group_size // 2 if shifted else 0)) // group_size", None],
    "shifted_heads: the first half": ["return torch.arange(num_heads) < num_heads // 2", None, None],
}
HARDER_CORRECT = {
    "helpers with a list and a where": [
        "return torch.tensor([h >= num_heads - num_heads // 2 for h in range(num_heads)], dtype=torch.bool)",
        "i = torch.arange(T, device=device)\nreturn torch.where(torch.tensor(shifted and group_size < T), (i + group_size // 2) // group_size, i // group_size)",
        None],
}
