//! What `ultra bench-serve --streams` sends: a [`Workload`] turns the run's settings into the
//! requests of each stream. One workload per file beside this one; [`by_name`] is the list the
//! `--workload` flag chooses from.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};

/// One request a stream sends.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
}

/// The settings every workload gets.
#[derive(Debug, Clone)]
pub struct WorkloadSettings {
    /// Vocabulary size of the served model (prompts are token ids below it).
    pub vocab: usize,
    /// Concurrent streams.
    pub streams: usize,
    /// Requests each stream sends one after another.
    pub requests_per_stream: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub seed: u64,
}

/// A benchmark workload: the requests of every stream, in the order each stream sends them.
pub trait Workload {
    /// Its `--workload` name.
    fn name(&self) -> &'static str;
    /// `streams` lists of requests.
    fn streams(&self, s: &WorkloadSettings) -> Result<Vec<Vec<BenchRequest>>>;
}

/// Independent random prompts of `prompt_tokens` tokens, `max_tokens` each (EOS ignored), a
/// different seed per stream.
pub struct Uniform;

impl Workload for Uniform {
    fn name(&self) -> &'static str {
        "uniform"
    }

    fn streams(&self, s: &WorkloadSettings) -> Result<Vec<Vec<BenchRequest>>> {
        if s.vocab == 0 || s.prompt_tokens == 0 || s.max_tokens == 0 {
            bail!("the uniform workload needs a vocabulary, prompt tokens and max tokens above 0");
        }
        Ok((0..s.streams)
            .map(|i| {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed ^ ((i as u64) << 20));
                (0..s.requests_per_stream)
                    .map(|_| BenchRequest {
                        prompt: (0..s.prompt_tokens)
                            .map(|_| rng.random_range(0..s.vocab as u32))
                            .collect(),
                        max_tokens: s.max_tokens,
                    })
                    .collect()
            })
            .collect())
    }
}

/// The workloads `--workload` knows.
pub fn all() -> Vec<Box<dyn Workload>> {
    vec![Box::new(Uniform)]
}

/// The workload called `name`.
pub fn by_name(name: &str) -> Result<Box<dyn Workload>> {
    let all = all();
    let names: Vec<&str> = all.iter().map(|w| w.name()).collect();
    let known = names.join(", ");
    match all.into_iter().find(|w| w.name() == name) {
        Some(w) => Ok(w),
        None => bail!("unknown workload {name:?} (known: {known})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WorkloadSettings {
        WorkloadSettings {
            vocab: 100,
            streams: 3,
            requests_per_stream: 2,
            prompt_tokens: 5,
            max_tokens: 7,
            seed: 1,
        }
    }

    #[test]
    fn uniform_gives_each_stream_its_own_prompts() {
        let w = by_name("uniform").unwrap();
        let s = w.streams(&settings()).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.iter().all(|r| r.len() == 2));
        assert!(s.iter().flatten().all(|r| r.prompt.len() == 5
            && r.max_tokens == 7
            && r.prompt.iter().all(|&t| t < 100)));
        assert_ne!(s[0][0].prompt, s[1][0].prompt);
        // Reproducible from the seed.
        assert_eq!(s, w.streams(&settings()).unwrap());
    }

    #[test]
    fn unknown_workloads_and_empty_settings_are_errors() {
        let e = by_name("nope").err().unwrap().to_string();
        assert!(e.contains("uniform"), "{e}");
        let bad = WorkloadSettings {
            vocab: 0,
            ..settings()
        };
        assert!(Uniform.streams(&bad).is_err());
    }
}
