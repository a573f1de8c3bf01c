//! Tokenizer, incremental detokenizer and chat templates of a checkpoint directory.
//!
//! [`Tokenizer::from_dir`] reads, from a Hugging Face checkpoint directory:
//! * `tokenizer.json` (required) through the `tokenizers` crate;
//! * `tokenizer_config.json` (optional): `chat_template` as a string or as the list-of-named
//!   templates form (`[{"name": "default", "template": "…"}, {"name": "tool_use", …}]`, a plain
//!   `{name: template}` object is accepted too), and `bos_token` / `eos_token` / `pad_token` /
//!   `unk_token` as strings or `AddedToken` objects (`{"content": "<s>", …}`);
//! * `chat_template.jinja` (optional; overrides the config's default template, as in transformers),
//!   `chat_template.json` (optional, processor style `{"chat_template": …}`, used only when nothing
//!   else provides one) and `additional_chat_templates/*.jinja` (named templates);
//! * `generation_config.json` (optional): `eos_token_id` as an int or a list.
//!
//! EOS ids ([`Tokenizer::eos_token_ids`]) are the union of the tokenizer config's `eos_token` and
//! the generation config's `eos_token_id`. For gpt-oss / harmony checkpoints (the vocabulary has
//! `<|return|>` and `<|call|>`) both are always stop tokens and `<|end|>` never is: `<|end|>`
//! closes every harmony message, including the analysis channel before the final answer.
//!
//! Chat templates are rendered with minijinja configured like HF's Jinja environment:
//! `trim_blocks`, `lstrip_blocks`, loop controls, Python string / dict / list methods
//! (`minijinja_contrib::pycompat`), `raise_exception(msg)`, `strftime_now(fmt)` (UTC) and a
//! `tojson` filter that writes what Python's `json.dumps(x, ensure_ascii=False)` writes (with
//! `indent`, `separators`, `sort_keys`, `ensure_ascii` arguments). The render context holds
//! `messages`, `add_generation_prompt`, and the special tokens (`bos_token`, `eos_token`,
//! `pad_token`, `unk_token`) that the config defines. `{% generation %}` /
//! `{% endgeneration %}` markers (HF's assistant-mask extension) are stripped.

use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{AutoEscape, Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Names of the files this module reads.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
pub const CHAT_TEMPLATE_JSON_FILE: &str = "chat_template.json";
pub const ADDITIONAL_CHAT_TEMPLATES_DIR: &str = "additional_chat_templates";

/// Name of the template used when none is asked for.
pub const DEFAULT_TEMPLATE: &str = "default";

/// Errors of this module. File errors name the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: file not found", path.display())]
    MissingFile { path: PathBuf },
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {message}", path.display())]
    InvalidFile { path: PathBuf, message: String },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
    #[error(
        "{}: this checkpoint has no chat template (looked for `chat_template` in \
         tokenizer_config.json, chat_template.jinja and chat_template.json)",
        dir.display()
    )]
    NoChatTemplate { dir: PathBuf },
    #[error("no chat template named {name:?} (available: {available:?})")]
    UnknownChatTemplate {
        name: String,
        available: Vec<String>,
    },
    #[error("chat template {name:?}: {message}")]
    ChatTemplate { name: String, message: String },
}

/// One chat message: `{"role": …, "content": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Sampling defaults from `generation_config.json` (vLLM applies these unless the request sets
/// them). Every field is `None` when absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

/// A checkpoint's tokenizer plus its special tokens, EOS set and chat templates.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_ids: Vec<u32>,
    harmony: bool,
    generation: GenerationDefaults,
    /// name → template source (after preprocessing).
    templates: BTreeMap<String, String>,
    /// name → compile error, for templates that failed to compile.
    template_errors: BTreeMap<String, String>,
    env: Environment<'static>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_ids", &self.eos_ids)
            .field("harmony", &self.harmony)
            .field("templates", &self.templates.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn read_text(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            TokenizerError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            TokenizerError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

fn read_optional_text(path: &Path) -> Result<Option<String>, TokenizerError> {
    match read_text(path) {
        Ok(s) => Ok(Some(s)),
        Err(TokenizerError::MissingFile { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    match read_optional_text(path)? {
        None => Ok(None),
        Some(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| TokenizerError::Json {
                path: path.to_path_buf(),
                source: e,
            }),
    }
}

/// A special token given as a string or as an `AddedToken` object.
fn special_token(cfg: &Json, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> TokenizerError {
    TokenizerError::InvalidFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// `chat_template` of a config: a string, a list of `{name, template}`, or an object
/// `{name: template}`.
fn parse_chat_template_field(
    v: &Json,
    path: &Path,
) -> Result<BTreeMap<String, String>, TokenizerError> {
    let mut out = BTreeMap::new();
    match v {
        Json::Null => {}
        Json::String(s) => {
            out.insert(DEFAULT_TEMPLATE.to_string(), s.clone());
        }
        Json::Array(items) => {
            for item in items {
                let name = item.get("name").and_then(Json::as_str);
                let tpl = item.get("template").and_then(Json::as_str);
                match (name, tpl) {
                    (Some(n), Some(t)) => {
                        out.insert(n.to_string(), t.to_string());
                    }
                    _ => {
                        return Err(invalid(
                            path,
                            "chat_template list entries must be {\"name\": string, \"template\": string}",
                        ))
                    }
                }
            }
        }
        Json::Object(map) => {
            for (n, t) in map {
                let Some(t) = t.as_str() else {
                    return Err(invalid(
                        path,
                        format!("chat_template {n:?} is not a string"),
                    ));
                };
                out.insert(n.clone(), t.to_string());
            }
        }
        _ => {
            return Err(invalid(
                path,
                "chat_template must be a string, a list of {name, template} or an object",
            ))
        }
    }
    Ok(out)
}

fn json_u32(v: &Json) -> Option<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok())
}

impl Tokenizer {
    /// Loads the tokenizer of a checkpoint directory (see the module docs for the files read).
    /// `tokenizer.json` is required; the other files are optional, but a file that exists and
    /// cannot be parsed is an error naming it.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let dir = dir.as_ref().to_path_buf();

        let tok_path = dir.join(TOKENIZER_FILE);
        let tok_bytes = std::fs::read(&tok_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                TokenizerError::MissingFile {
                    path: tok_path.clone(),
                }
            } else {
                TokenizerError::Io {
                    path: tok_path.clone(),
                    source: e,
                }
            }
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&tok_bytes)
            .map_err(|e| invalid(&tok_path, format!("cannot load tokenizer: {e}")))?;

        // tokenizer_config.json
        let cfg_path = dir.join(TOKENIZER_CONFIG_FILE);
        let cfg = read_optional_json(&cfg_path)?.unwrap_or(Json::Null);
        if !cfg.is_null() && !cfg.is_object() {
            return Err(invalid(&cfg_path, "expected a JSON object"));
        }
        let bos_token = special_token(&cfg, "bos_token");
        let eos_token = special_token(&cfg, "eos_token");
        let pad_token = special_token(&cfg, "pad_token");
        let unk_token = special_token(&cfg, "unk_token");

        // Chat templates: tokenizer_config.json, then chat_template.json as a fallback, then
        // chat_template.jinja overriding the default, then additional_chat_templates/*.jinja.
        let mut templates = match cfg.get("chat_template") {
            Some(v) => parse_chat_template_field(v, &cfg_path)?,
            None => BTreeMap::new(),
        };
        if templates.is_empty() {
            let p = dir.join(CHAT_TEMPLATE_JSON_FILE);
            if let Some(j) = read_optional_json(&p)? {
                if let Some(v) = j.get("chat_template") {
                    templates = parse_chat_template_field(v, &p)?;
                }
            }
        }
        if let Some(t) = read_optional_text(&dir.join(CHAT_TEMPLATE_FILE))? {
            templates.insert(DEFAULT_TEMPLATE.to_string(), t);
        }
        let extra_dir = dir.join(ADDITIONAL_CHAT_TEMPLATES_DIR);
        if extra_dir.is_dir() {
            let entries = std::fs::read_dir(&extra_dir).map_err(|e| TokenizerError::Io {
                path: extra_dir.clone(),
                source: e,
            })?;
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
                .collect();
            paths.sort();
            for p in paths {
                if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                    let stem = stem.to_string();
                    let t = read_text(&p)?;
                    templates.entry(stem).or_insert(t);
                }
            }
        }

        // generation_config.json
        let gen_path = dir.join(GENERATION_CONFIG_FILE);
        let gen = read_optional_json(&gen_path)?.unwrap_or(Json::Null);
        if !gen.is_null() && !gen.is_object() {
            return Err(invalid(&gen_path, "expected a JSON object"));
        }
        let mut gen_eos: Vec<u32> = Vec::new();
        match gen.get("eos_token_id") {
            None | Some(Json::Null) => {}
            Some(Json::Array(a)) => {
                for v in a {
                    gen_eos.push(json_u32(v).ok_or_else(|| {
                        invalid(
                            &gen_path,
                            format!("eos_token_id entry {v} is not a token id"),
                        )
                    })?);
                }
            }
            Some(v) => gen_eos.push(json_u32(v).ok_or_else(|| {
                invalid(
                    &gen_path,
                    format!("eos_token_id {v} is not a token id or a list"),
                )
            })?),
        }
        let f = |k: &str| gen.get(k).and_then(Json::as_f64).map(|x| x as f32);
        let u = |k: &str| gen.get(k).and_then(Json::as_u64).map(|x| x as usize);
        let generation = GenerationDefaults {
            do_sample: gen.get("do_sample").and_then(Json::as_bool),
            temperature: f("temperature"),
            top_k: u("top_k"),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            max_new_tokens: u("max_new_tokens"),
        };

        // EOS set.
        let mut eos_ids: Vec<u32> = Vec::new();
        let mut add = |id: u32| {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        };
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            add(id);
        }
        for id in gen_eos {
            add(id);
        }
        let ret = inner.token_to_id("<|return|>");
        let call = inner.token_to_id("<|call|>");
        let harmony = ret.is_some() && call.is_some();
        if let (Some(r), Some(c)) = (ret, call) {
            add(r);
            add(c);
            if let Some(end) = inner.token_to_id("<|end|>") {
                eos_ids.retain(|&x| x != end);
            }
        }
        let bos_token_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));

        // Template environment.
        let mut env = new_environment();
        let mut template_errors = BTreeMap::new();
        let mut processed = BTreeMap::new();
        for (name, src) in templates {
            let src = preprocess_template(&src);
            if let Err(e) = env.add_template_owned(name.clone(), src.clone()) {
                template_errors.insert(name.clone(), format_jinja_error(&e));
            }
            processed.insert(name, src);
        }

        Ok(Tokenizer {
            inner,
            dir,
            bos_token,
            eos_token,
            pad_token,
            unk_token,
            bos_token_id,
            eos_ids,
            harmony,
            generation,
            templates: processed,
            template_errors,
            env,
        })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The directory this tokenizer was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`. `add_special_tokens` runs the tokenizer's post-processor (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// A streaming detokenizer borrowing this tokenizer (see [`IncrementalDecoder`]).
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream<'_> {
        DecodeStream {
            tokenizer: self,
            state: IncrementalDecoder::new(skip_special_tokens),
        }
    }

    /// Id of a token string (including added / special tokens).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Token ids that end generation (see the module docs). May be empty.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// `bos_token` of the tokenizer config.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// Id of `bos_token`, when it is in the vocabulary.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// `eos_token` of the tokenizer config.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// `pad_token` of the tokenizer config.
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// Whether this is a harmony (gpt-oss) vocabulary: `<|return|>` and `<|call|>` exist.
    pub fn is_harmony(&self) -> bool {
        self.harmony
    }

    /// Sampling defaults from `generation_config.json`.
    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.generation
    }

    /// Whether any chat template was found.
    pub fn has_chat_template(&self) -> bool {
        !self.templates.is_empty()
    }

    /// Names of the chat templates (`"default"` for a single template).
    pub fn chat_template_names(&self) -> Vec<&str> {
        self.templates.keys().map(String::as_str).collect()
    }

    /// Source of a chat template (after stripping `{% generation %}` markers).
    pub fn chat_template_source(&self, name: &str) -> Option<&str> {
        self.templates.get(name).map(String::as_str)
    }

    /// Renders the default chat template over `messages`; with `add_generation_prompt` the prompt
    /// ends with the header of an assistant turn. Encode the result with
    /// `add_special_tokens = false` (as HF and vLLM do): templates write BOS themselves.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let ctx = serde_json::json!({
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        });
        self.render_chat_template(None, &ctx)
    }

    /// Renders a chat template with an arbitrary context object (`messages` with tool calls or
    /// content parts, `tools`, `documents`, `reasoning_effort`, …). `bos_token` / `eos_token` /
    /// `pad_token` / `unk_token` are added unless the context sets them.
    ///
    /// Template choice follows transformers: `template` by name if given; otherwise `tool_use`
    /// when the context has non-null `tools` and such a template exists; otherwise `default`.
    pub fn render_chat_template(
        &self,
        template: Option<&str>,
        context: &Json,
    ) -> Result<String, TokenizerError> {
        if self.templates.is_empty() {
            return Err(TokenizerError::NoChatTemplate {
                dir: self.dir.clone(),
            });
        }
        let available = || self.templates.keys().cloned().collect::<Vec<_>>();
        let name: &str = match template {
            Some(n) => {
                if !self.templates.contains_key(n) {
                    return Err(TokenizerError::UnknownChatTemplate {
                        name: n.to_string(),
                        available: available(),
                    });
                }
                n
            }
            None => {
                let has_tools = context.get("tools").is_some_and(|t| !t.is_null());
                if has_tools && self.templates.contains_key("tool_use") {
                    "tool_use"
                } else if self.templates.contains_key(DEFAULT_TEMPLATE) {
                    DEFAULT_TEMPLATE
                } else {
                    return Err(TokenizerError::UnknownChatTemplate {
                        name: DEFAULT_TEMPLATE.to_string(),
                        available: available(),
                    });
                }
            }
        };
        if let Some(msg) = self.template_errors.get(name) {
            return Err(TokenizerError::ChatTemplate {
                name: name.to_string(),
                message: msg.clone(),
            });
        }
        let mut ctx = serde_json::Map::new();
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ] {
            if let Some(v) = v {
                ctx.insert(k.to_string(), Json::String(v.clone()));
            }
        }
        match context {
            Json::Object(m) => {
                for (k, v) in m {
                    ctx.insert(k.clone(), v.clone());
                }
            }
            Json::Null => {}
            _ => {
                return Err(TokenizerError::ChatTemplate {
                    name: name.to_string(),
                    message: "the render context must be a JSON object".to_string(),
                })
            }
        }
        let err = |e: JinjaError| TokenizerError::ChatTemplate {
            name: name.to_string(),
            message: format_jinja_error(&e),
        };
        let tmpl = self.env.get_template(name).map_err(err)?;
        tmpl.render(Value::from_serialize(&ctx)).map_err(err)
    }
}

/// Error text including the chain of causes (minijinja puts the useful part in the detail).
fn format_jinja_error(e: &JinjaError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        let _ = write!(s, ": {c}");
        src = c.source();
    }
    s
}

// ------------------------------------------------------------------------------------------------
// Incremental detokenization
// ------------------------------------------------------------------------------------------------

/// Owned state of a streaming detokenizer (HF / vLLM prefix-offset algorithm): each step decodes
/// a short window of recent ids and emits only the new text once it does not end in an incomplete
/// UTF-8 sequence (U+FFFD), so multi-byte characters split over several tokens come out whole.
/// Owned so that it can live in a per-request struct; [`DecodeStream`] is the borrowing form.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Decoding of `ids[prefix_offset..read_offset]`, when known.
    prefix_text: Option<String>,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        IncrementalDecoder {
            skip_special_tokens,
            ..Default::default()
        }
    }

    /// Starts after `context` (typically the last few prompt ids; vLLM uses 5), so that decoders
    /// that treat the start of the text specially (SentencePiece's leading space) decode the first
    /// generated token as a continuation. The context itself is never emitted.
    pub fn with_context(skip_special_tokens: bool, context: &[u32]) -> Self {
        IncrementalDecoder {
            skip_special_tokens,
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
            prefix_text: None,
        }
    }

    /// Adds one token; returns the newly completed text, or `None` while the text is incomplete
    /// (or the token decodes to nothing, e.g. a skipped special token).
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let prefix_text = match self.prefix_text.take() {
            Some(p) => p,
            None => tok.decode(
                &self.ids[self.prefix_offset..self.read_offset],
                self.skip_special_tokens,
            )?,
        };
        let new_text = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}') {
            let delta = text_after(&new_text, &prefix_text).to_string();
            // Slide the window: the old read window becomes the prefix.
            let drop = self.read_offset;
            self.ids.drain(..drop);
            self.prefix_offset = 0;
            self.read_offset = self.ids.len();
            self.prefix_text = None;
            Ok(Some(delta))
        } else {
            self.prefix_text = Some(prefix_text);
            Ok(None)
        }
    }

    /// Releases whatever is still pending at the end of a sequence (an incomplete UTF-8 sequence
    /// comes out as U+FFFD, as in a full decode) and resets the window.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>, TokenizerError> {
        if self.read_offset >= self.ids.len() {
            return Ok(None);
        }
        let prefix_text = match self.prefix_text.take() {
            Some(p) => p,
            None => tok.decode(
                &self.ids[self.prefix_offset..self.read_offset],
                self.skip_special_tokens,
            )?,
        };
        let new_text = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        let drop = self.read_offset;
        self.ids.drain(..drop);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        self.prefix_text = None;
        if new_text.len() > prefix_text.len() {
            Ok(Some(text_after(&new_text, &prefix_text).to_string()))
        } else {
            Ok(None)
        }
    }
}

/// `new` minus its `prefix`; when the decoder changed the prefix's text (rare, e.g. cleanup
/// rules), falls back to cutting at the prefix's length rounded up to a char boundary.
fn text_after<'a>(new: &'a str, prefix: &str) -> &'a str {
    if let Some(rest) = new.strip_prefix(prefix) {
        return rest;
    }
    let mut i = prefix.len().min(new.len());
    while !new.is_char_boundary(i) {
        i += 1;
    }
    &new[i..]
}

/// Streaming detokenizer borrowing a [`Tokenizer`] (the `tokenizers` crate's `DecodeStream`
/// shape): `step(id)` returns the newly completed text.
pub struct DecodeStream<'a> {
    tokenizer: &'a Tokenizer,
    state: IncrementalDecoder,
}

impl DecodeStream<'_> {
    /// See [`IncrementalDecoder::step`].
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.state.step(self.tokenizer, id)
    }

    /// See [`IncrementalDecoder::flush`].
    pub fn flush(&mut self) -> Result<Option<String>, TokenizerError> {
        self.state.flush(self.tokenizer)
    }
}

// ------------------------------------------------------------------------------------------------
// Chat template environment
// ------------------------------------------------------------------------------------------------

fn new_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

fn raise_exception(msg: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> Result<String, JinjaError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(strftime_utc(secs, &fmt))
}

/// Removes HF's `{% generation %}` / `{% endgeneration %}` markers (with any whitespace control).
fn preprocess_template(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(len) = generation_marker_len(tail) {
            rest = &tail[len..];
        } else {
            out.push_str("{%");
            rest = &tail[2..];
        }
    }
    out.push_str(rest);
    out
}

/// Length of a `{%[-+]? (end)?generation [-+]?%}` tag at the start of `s`, if it is one.
fn generation_marker_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 2;
    if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
        i += 1;
    }
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let word = if s[i..].starts_with("endgeneration") {
        "endgeneration"
    } else if s[i..].starts_with("generation") {
        "generation"
    } else {
        return None;
    };
    i += word.len();
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
        i += 1;
    }
    if s[i..].starts_with("%}") {
        Some(i + 2)
    } else {
        None
    }
}

/// HF's `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`. Positional arguments in that order after the value are accepted too.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, JinjaError> {
    let arg = |pos: usize, name: &str| -> Result<Option<Value>, JinjaError> {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            return Ok(Some(v));
        }
        Ok(args.get(pos).cloned())
    };
    let truthy = |v: Option<Value>| v.is_some_and(|v| v.is_true());
    let ensure_ascii = truthy(arg(0, "ensure_ascii")?);
    let indent = match arg(1, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(n) = v.as_i64() {
                Some(" ".repeat(n.max(0) as usize))
            } else if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        }
    };
    let separators = match arg(2, "separators")? {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let items: Vec<Value> = v.try_iter()?.collect();
            match (
                items.first().and_then(|x| x.as_str()),
                items.get(1).and_then(|x| x.as_str()),
            ) {
                (Some(a), Some(b)) if items.len() == 2 => Some((a.to_string(), b.to_string())),
                _ => {
                    return Err(JinjaError::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        _ => None,
    };
    let sort_keys = truthy(arg(3, "sort_keys")?);
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = separators.unwrap_or_else(|| {
        if indent.is_some() {
            (",".to_string(), ": ".to_string())
        } else {
            (", ".to_string(), ": ".to_string())
        }
    });
    let opts = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    opts.write(&mut out, value, 0)?;
    Ok(out)
}

struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, out: &mut String, level: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, out: &mut String, v: &Value, level: usize) -> Result<(), JinjaError> {
        match v.kind() {
            ValueKind::Invalid => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: invalid value: {v}"),
                ))
            }
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => write_py_number(out, v),
            ValueKind::String => self.write_str(out, v.as_str().unwrap_or("")),
            ValueKind::Bytes => self.write_str(out, &v.to_string()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, level + 1);
                    self.write(out, item, level + 1)?;
                }
                self.newline(out, level);
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for k in v.try_iter()? {
                    let val = v.get_item(&k)?;
                    let key = match k.kind() {
                        ValueKind::String => k.as_str().unwrap_or("").to_string(),
                        ValueKind::None | ValueKind::Undefined => "null".to_string(),
                        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
                        ValueKind::Number => {
                            let mut s = String::new();
                            write_py_number(&mut s, &k);
                            s
                        }
                        _ => k.to_string(),
                    };
                    entries.push((key, val));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                if entries.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, (k, val)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, level + 1);
                    self.write_str(out, k);
                    out.push_str(&self.key_sep);
                    self.write(out, val, level + 1)?;
                }
                self.newline(out, level);
                out.push('}');
            }
            _ => {
                // Objects without structure (e.g. macros): serialize their string form, which is
                // what a lenient Python would come closest to.
                self.write_str(out, &v.to_string());
            }
        }
        Ok(())
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !(' '..='~').contains(&c) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr` of an int or float (`1.0`, `1e+20`, `1.5e-07`, `NaN`, `Infinity`).
fn write_py_number(out: &mut String, v: &Value) {
    if v.is_integer() {
        if let Ok(i) = i128::try_from(v.clone()) {
            let _ = write!(out, "{i}");
            return;
        }
    }
    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
    out.push_str(&py_float_repr(f));
}

fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Shortest round-trip digits and decimal exponent.
    let sci = format!("{:e}", f);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let s = if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{}{}.0", digits, "0".repeat((int_len - n) as usize))
            } else {
                format!(
                    "{}.{}",
                    &digits[..int_len as usize],
                    &digits[int_len as usize..]
                )
            }
        } else {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

/// A small `strftime` over UTC: `%Y %y %m %d %e %H %I %M %S %p %j %a %A %b %B %h %F %T %D %R %Z
/// %z %%`; unknown directives are kept verbatim.
fn strftime_utc(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let wd = (days + 3).rem_euclid(7) as usize;
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(k) = it.next() else {
            out.push('%');
            break;
        };
        let _ = match k {
            'Y' => write!(out, "{y}"),
            'y' => write!(out, "{:02}", y.rem_euclid(100)),
            'm' => write!(out, "{m:02}"),
            'd' => write!(out, "{d:02}"),
            'e' => write!(out, "{d:>2}"),
            'H' => write!(out, "{hh:02}"),
            'I' => write!(out, "{h12:02}"),
            'M' => write!(out, "{mm:02}"),
            'S' => write!(out, "{ss:02}"),
            'p' => write!(out, "{}", if hh < 12 { "AM" } else { "PM" }),
            'j' => write!(out, "{yday:03}"),
            'a' => write!(out, "{}", &DAYS[wd][..3]),
            'A' => write!(out, "{}", DAYS[wd]),
            'b' | 'h' => write!(out, "{}", &MONTHS[(m - 1) as usize][..3]),
            'B' => write!(out, "{}", MONTHS[(m - 1) as usize]),
            'F' => write!(out, "{y}-{m:02}-{d:02}"),
            'T' => write!(out, "{hh:02}:{mm:02}:{ss:02}"),
            'R' => write!(out, "{hh:02}:{mm:02}"),
            'D' => write!(out, "{m:02}/{d:02}/{:02}", y.rem_euclid(100)),
            'Z' => write!(out, "UTC"),
            'z' => write!(out, "+0000"),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29T13:05:09Z, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime_utc(t, "%Y-%m-%d %H:%M:%S"), "2024-02-29 13:05:09");
        assert_eq!(strftime_utc(t, "%d %b %Y"), "29 Feb 2024");
        assert_eq!(
            strftime_utc(t, "%A %B %j %I%p %%"),
            "Thursday February 060 01PM %"
        );
        assert_eq!(strftime_utc(0, "%F %T %a"), "1970-01-01 00:00:00 Thu");
        assert_eq!(strftime_utc(-86_400, "%F"), "1969-12-31");
        assert_eq!(strftime_utc(t, "%Q"), "%Q");
    }

    #[test]
    fn python_float_repr() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123.456, "123.456"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(py_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn generation_markers_are_stripped() {
        let src = "{% for m in messages %}{%- generation -%}{{ m }}{% endgeneration %}{% endfor %}";
        assert_eq!(
            preprocess_template(src),
            "{% for m in messages %}{{ m }}{% endfor %}"
        );
        assert_eq!(
            preprocess_template("{% if x %}a{% endif %}"),
            "{% if x %}a{% endif %}"
        );
    }
}
