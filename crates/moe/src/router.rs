//! Router variants: logits → selected experts + gate weights.

use crate::RoutingError;

/// The experts selected for one token and their gate weights.
///
/// `experts[j]` and `weights[j]` belong together. Experts are in descending order of their
/// selection score, equal scores by lower expert id first (see the crate docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    /// Selected expert ids, `len() == k`.
    pub experts: Vec<usize>,
    /// Gate weight of each selected expert (the factor its output is multiplied by).
    pub weights: Vec<f32>,
}

impl Routing {
    /// An empty routing with room for `k` experts (for use with [`route_into`]).
    pub fn with_capacity(k: usize) -> Self {
        Self {
            experts: Vec::with_capacity(k),
            weights: Vec::with_capacity(k),
        }
    }

    /// Number of selected experts.
    pub fn len(&self) -> usize {
        self.experts.len()
    }

    /// Whether no expert is selected.
    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }
}

/// Parameters of the sigmoid router (DeepSeek-V3, MiMo-V2-Flash).
///
/// ```text
/// s = sigmoid(z)                           scores used for the weights
/// c = s + correction_bias                  scores used for selection only
/// if n_group > 1: group score = sum of the top-2 c in the group (max of c without a bias);
///                 keep the topk_group best groups, exclude the experts of the others
/// S = top-k of c over the kept experts
/// w_e = s_e                          (e ∈ S)
/// w_e = s_e / (Σ_{j∈S} s_j + 1e-20)  if norm_topk_prob (transformers' epsilon)
/// w_e ← w_e · routed_scaling_factor
/// ```
///
/// Excluded groups are masked with −∞ as in DeepSeek-V3's reference (`inference/model.py`), so
/// their experts are never selected; transformers masks with 0.0 instead, which differs only
/// when every candidate `c` of the kept groups is negative. A group of a single expert scores
/// that expert's `c` (the "top-2" sum has only one term).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SigmoidRouter<'a> {
    /// `e_score_correction_bias`, one per expert; affects selection only.
    pub correction_bias: Option<&'a [f32]>,
    /// Number of expert groups (`n_group`); 1 disables group-limited selection.
    pub n_group: usize,
    /// Number of groups kept (`topk_group`), in `1..=n_group`.
    pub topk_group: usize,
    /// Renormalize the selected weights to sum to 1 (`norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Final multiplier of the weights (`routed_scaling_factor`; `null` in a config means 1.0).
    pub routed_scaling_factor: f32,
}

impl<'a> SigmoidRouter<'a> {
    /// No groups, renormalized, scaling 1.0: MiMo-V2-Flash's router (`n_group = topk_group = 1`,
    /// `norm_topk_prob = true`, `routed_scaling_factor = null`).
    pub fn new(correction_bias: Option<&'a [f32]>) -> Self {
        Self {
            correction_bias,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        }
    }
}

/// Which routing variant to apply, with its parameters. Borrowed biases keep it `Copy`; build
/// one per layer from that layer's tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterKind<'a> {
    /// gpt-oss (`GptOssTopKRouter`): top-k on `z + bias`, then softmax over the k selected
    /// values. Pass `bias: None` when the router bias is already added to the logits.
    GptOss {
        /// Router bias `b_r`, one per expert, added to the logits before selection.
        bias: Option<&'a [f32]>,
    },
    /// Qwen3-MoE: numerically stable softmax over all experts, top-k of the probabilities, then
    /// divide by their sum if `norm_topk_prob`.
    Qwen3Moe {
        /// Renormalize the selected probabilities to sum to 1.
        norm_topk_prob: bool,
    },
    /// Sigmoid router with selection-only bias, optional groups, renormalization and scaling
    /// (DeepSeek-V3, MiMo-V2-Flash). See [`SigmoidRouter`].
    Sigmoid(SigmoidRouter<'a>),
}

/// Reusable scratch buffers for [`route_into`] (only the grouped sigmoid router uses them).
#[derive(Debug, Clone, Default)]
pub struct RouterScratch {
    group_scores: Vec<f32>,
    group_ids: Vec<usize>,
    group_sel: Vec<f32>,
    group_keep: Vec<bool>,
}

impl RouterScratch {
    /// Empty scratch; buffers grow on first use.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Routes one token: `logits` has one entry per expert, `k` experts are selected.
///
/// Allocates the returned [`Routing`]; see [`route_into`] for the allocation-free form.
pub fn route(kind: &RouterKind<'_>, logits: &[f32], k: usize) -> Result<Routing, RoutingError> {
    let mut out = Routing::with_capacity(k);
    let mut scratch = RouterScratch::new();
    route_into(kind, logits, k, &mut scratch, &mut out)?;
    Ok(out)
}

/// Routes one token into `out` (cleared first), using `scratch` for temporaries.
///
/// Performs no heap allocation once `out` has capacity for `k` entries and `scratch` has been
/// used with the same group configuration. On error `out` is left empty.
pub fn route_into(
    kind: &RouterKind<'_>,
    logits: &[f32],
    k: usize,
    scratch: &mut RouterScratch,
    out: &mut Routing,
) -> Result<(), RoutingError> {
    out.experts.clear();
    out.weights.clear();
    let num_experts = logits.len();
    if k == 0 {
        return Err(RoutingError::ZeroK);
    }
    if k > num_experts {
        return Err(RoutingError::KExceedsExperts { k, num_experts });
    }
    if let Some((index, &value)) = logits.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(RoutingError::NonFiniteLogit { index, value });
    }
    out.experts.reserve(k);
    out.weights.reserve(k);
    match *kind {
        RouterKind::GptOss { bias } => {
            check_bias(bias, num_experts)?;
            route_gpt_oss(logits, bias, k, out);
        }
        RouterKind::Qwen3Moe { norm_topk_prob } => route_qwen3(logits, norm_topk_prob, k, out),
        RouterKind::Sigmoid(ref p) => route_sigmoid(p, logits, k, scratch, out)?,
    }
    Ok(())
}

fn check_bias(bias: Option<&[f32]>, num_experts: usize) -> Result<(), RoutingError> {
    if let Some(b) = bias {
        if b.len() != num_experts {
            return Err(RoutingError::BiasLength {
                got: b.len(),
                expected: num_experts,
            });
        }
        if let Some((index, &value)) = b.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(RoutingError::NonFiniteBias { index, value });
        }
    }
    Ok(())
}

/// Offers `(id, score)` to the running top-`k` list `ids`/`scores` (descending score; ids must be
/// offered in ascending order so that equal scores keep the lower id first). Never grows the
/// vectors beyond `k`.
#[inline]
fn offer(ids: &mut Vec<usize>, scores: &mut Vec<f32>, k: usize, id: usize, score: f32) {
    if ids.len() == k {
        match scores.last() {
            Some(&last) if score > last => {
                ids.pop();
                scores.pop();
            }
            _ => return,
        }
    }
    let pos = scores
        .iter()
        .position(|&s| s < score)
        .unwrap_or(scores.len());
    ids.insert(pos, id);
    scores.insert(pos, score);
}

fn route_gpt_oss(logits: &[f32], bias: Option<&[f32]>, k: usize, out: &mut Routing) {
    for (e, &z) in logits.iter().enumerate() {
        let score = match bias {
            Some(b) => z + b[e],
            None => z,
        };
        offer(&mut out.experts, &mut out.weights, k, e, score);
    }
    // Softmax over the k selected values; the first is the maximum.
    let max = out.weights[0];
    let mut sum = 0.0f32;
    for w in out.weights.iter_mut() {
        *w = (*w - max).exp();
        sum += *w;
    }
    // sum >= 1 (the max term is exp(0)).
    for w in out.weights.iter_mut() {
        *w /= sum;
    }
}

fn route_qwen3(logits: &[f32], norm_topk_prob: bool, k: usize, out: &mut Routing) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for &z in logits {
        sum += (z - max).exp();
    }
    // sum >= 1, so every probability is finite; the same expression is evaluated for each
    // expert, so selection compares exactly the probabilities that are returned.
    for (e, &z) in logits.iter().enumerate() {
        let p = (z - max).exp() / sum;
        offer(&mut out.experts, &mut out.weights, k, e, p);
    }
    if norm_topk_prob {
        let sel: f32 = out.weights.iter().sum();
        // sel >= the largest probability >= 1/E > 0.
        for w in out.weights.iter_mut() {
            *w /= sel;
        }
    }
}

#[inline]
fn sigmoid(z: f32) -> f32 {
    // For very negative z, exp(-z) = inf and the result is 0; never NaN for finite z.
    1.0 / (1.0 + (-z).exp())
}

fn route_sigmoid(
    p: &SigmoidRouter<'_>,
    logits: &[f32],
    k: usize,
    scratch: &mut RouterScratch,
    out: &mut Routing,
) -> Result<(), RoutingError> {
    let num_experts = logits.len();
    check_bias(p.correction_bias, num_experts)?;
    if p.n_group == 0 || !num_experts.is_multiple_of(p.n_group) {
        return Err(RoutingError::GroupsDoNotDivide {
            n_group: p.n_group,
            num_experts,
        });
    }
    if p.topk_group == 0 || p.topk_group > p.n_group {
        return Err(RoutingError::TopkGroupOutOfRange {
            topk_group: p.topk_group,
            n_group: p.n_group,
        });
    }
    let group_size = num_experts / p.n_group;
    let kept = p.topk_group * group_size;
    if k > kept {
        return Err(RoutingError::KExceedsKeptExperts { k, kept });
    }
    if !p.routed_scaling_factor.is_finite() {
        return Err(RoutingError::NonFiniteScalingFactor(
            p.routed_scaling_factor,
        ));
    }

    let bias = p.correction_bias;
    let choice = |e: usize| -> f32 {
        let s = sigmoid(logits[e]);
        match bias {
            Some(b) => s + b[e],
            None => s,
        }
    };

    let grouped = p.topk_group < p.n_group;
    if grouped {
        let RouterScratch {
            group_scores,
            group_ids,
            group_sel,
            group_keep,
        } = scratch;
        group_scores.clear();
        for g in 0..p.n_group {
            let base = g * group_size;
            let score = if bias.is_some() {
                // Sum of the top-2 (fewer if the group is smaller) biased scores.
                let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for e in base..base + group_size {
                    let c = choice(e);
                    if c > first {
                        second = first;
                        first = c;
                    } else if c > second {
                        second = c;
                    }
                }
                if group_size >= 2 {
                    first + second
                } else {
                    first
                }
            } else {
                (base..base + group_size)
                    .map(choice)
                    .fold(f32::NEG_INFINITY, f32::max)
            };
            group_scores.push(score);
        }
        group_ids.clear();
        group_sel.clear();
        group_ids.reserve(p.topk_group);
        group_sel.reserve(p.topk_group);
        for (g, &score) in group_scores.iter().enumerate() {
            offer(group_ids, group_sel, p.topk_group, g, score);
        }
        group_keep.clear();
        group_keep.resize(p.n_group, false);
        for &g in group_ids.iter() {
            group_keep[g] = true;
        }
        for e in 0..num_experts {
            if group_keep[e / group_size] {
                offer(&mut out.experts, &mut out.weights, k, e, choice(e));
            }
        }
    } else {
        for e in 0..num_experts {
            offer(&mut out.experts, &mut out.weights, k, e, choice(e));
        }
    }

    // Weights from the unbiased scores.
    for (w, &e) in out.weights.iter_mut().zip(out.experts.iter()) {
        *w = sigmoid(logits[e]);
    }
    if p.norm_topk_prob {
        let denom = out.weights.iter().sum::<f32>() + 1e-20;
        for w in out.weights.iter_mut() {
            *w /= denom;
        }
    }
    for w in out.weights.iter_mut() {
        *w *= p.routed_scaling_factor;
    }
    Ok(())
}
