//! The output side of one sequence, shared by `ultra generate` and the server so that both give
//! the same tokens and text for the same seed: sampling ([`Sampler`]), incremental
//! detokenization ([`IncrementalDecoder`]) and stop handling with held-back streaming
//! ([`StopChecker`]).

use anyhow::Result;
use model::sampling::{
    FinishReason, Sampler, SamplingParams, StopCause, StopChecker, StopStatus, UniformStream,
};
use model::tokenizer::{IncrementalDecoder, Tokenizer};

/// What one token added to the output.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub token: u32,
    /// Text that became final with this token (may be empty).
    pub text: String,
    /// Set when this token ended the sequence.
    pub finish: Option<(FinishReason, StopCause)>,
}

/// One sequence's sampler, detokenizer and stop checker.
#[derive(Debug, Clone)]
pub struct TokenOutput {
    sampler: Sampler,
    stop: StopChecker,
    decoder: Option<IncrementalDecoder>,
    /// Prompt and generated tokens (what the penalties see: the repetition penalty all of them,
    /// the presence / frequency penalties those after `prompt_len`).
    history: Vec<u32>,
    prompt_len: usize,
    /// Text released by the detokenizer after a length stop (an unfinished UTF-8 character).
    tail: String,
}

impl TokenOutput {
    /// Validates `params`; `eos` are the ids that end generation unless `params.ignore_eos`;
    /// `detokenize` says whether text deltas are produced (needs a tokenizer at each call).
    pub fn new(
        params: &SamplingParams,
        eos: &[u32],
        prompt: &[u32],
        detokenize: bool,
    ) -> Result<Self> {
        params.validate()?;
        Ok(TokenOutput {
            sampler: Sampler::new(params)?,
            stop: StopChecker::from_params(params, eos),
            decoder: detokenize.then(|| IncrementalDecoder::new(true)),
            history: prompt.to_vec(),
            prompt_len: prompt.len(),
            tail: String::new(),
        })
    }

    /// Samples the next token from `logits` and pushes it ([`TokenOutput::push`]).
    pub fn sample(&mut self, logits: &[f32], tokenizer: Option<&Tokenizer>) -> Result<Emitted> {
        let (prompt, generated) = self.history.split_at(self.prompt_len);
        let token = self.sampler.try_sample(logits, prompt, generated)?;
        self.push(token, tokenizer)
    }

    /// What a device sampler needs to pick this sequence's next token exactly as
    /// [`TokenOutput::sample`] would: the parameters, the prompt, the generated tokens and where
    /// the sampler's uniform stream stands.
    pub fn device_row(&self) -> (&SamplingParams, &[u32], &[u32], UniformStream) {
        let (prompt, generated) = self.history.split_at(self.prompt_len);
        (
            self.sampler.params(),
            prompt,
            generated,
            self.sampler.stream(),
        )
    }

    /// Pushes a token a device sampler drew for [`TokenOutput::device_row`]: consumes the
    /// uniform it read (sampled parameters; greedy ones read none), then
    /// [`TokenOutput::push`].
    pub fn push_device_sampled(
        &mut self,
        token: u32,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<Emitted> {
        if !self.sampler.params().is_greedy() {
            self.sampler.skip_uniform();
        }
        self.push(token, tokenizer)
    }

    /// Adds a token chosen elsewhere (e.g. by the speculative loop): detokenizes it and checks
    /// the stops. After a length stop, the detokenizer's unfinished bytes are released (lossily)
    /// so that the text equals a full decode.
    pub fn push(&mut self, token: u32, tokenizer: Option<&Tokenizer>) -> Result<Emitted> {
        self.history.push(token);
        let delta = match (self.decoder.as_mut(), tokenizer) {
            (Some(d), Some(t)) => d.step(t, token)?.unwrap_or_default(),
            _ => String::new(),
        };
        Ok(match self.stop.push(token, &delta) {
            StopStatus::Continue { emit } => Emitted {
                token,
                text: emit,
                finish: None,
            },
            StopStatus::Stop {
                reason,
                cause,
                mut trim,
            } => {
                if reason == FinishReason::Length {
                    if let (Some(d), Some(t)) = (self.decoder.as_mut(), tokenizer) {
                        let rest = d.flush(t)?.unwrap_or_default();
                        trim.push_str(&rest);
                        self.tail = rest;
                    }
                }
                Emitted {
                    token,
                    text: trim,
                    finish: Some((reason, cause)),
                }
            }
        })
    }

    /// Ends the sequence for a reason the stop checker does not see (abort, error); returns the
    /// held-back text.
    pub fn finish(&mut self) -> String {
        self.stop.finish()
    }

    /// Generated tokens so far.
    pub fn tokens(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// Prompt and generated tokens.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// All text emitted so far.
    pub fn text(&self) -> String {
        format!("{}{}", self.stop.text(), self.tail)
    }
}
