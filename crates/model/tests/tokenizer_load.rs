//! Tokenizer tests: loading a checkpoint directory (tokenizer.json written here as a small
//! byte-level BPE), encode/decode round trips, incremental decoding of multi-byte characters,
//! EOS sets (generation_config int / list, harmony), chat templates (string, named list,
//! chat_template.jinja, HF helpers) and errors for missing / corrupt files.

use model::tokenizer::{ChatMessage, Tokenizer, TokenizerError};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ultra-tokenizer-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn write(&self, name: &str, text: &str) {
        let p = self.0.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(p, text).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// GPT-2's byte → printable char table.
fn byte_to_char() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(&cs) {
        table[*b as usize] = char::from_u32(*c).unwrap();
    }
    table
}

const BOS: u32 = 259;
const EOS: u32 = 260;

/// A byte-level BPE tokenizer.json: ids 0..256 are the bytes, three merges ("he", "ll",
/// "hell" = 256..258), then added special tokens `<|bos|>` 259, `<|eos|>` 260, `<|im_start|>`
/// 261, `<|im_end|>` 262 and `extra` from 263 on. The post-processor prepends `<|bos|>`.
fn tokenizer_json(extra: &[&str]) -> String {
    let table = byte_to_char();
    let mut vocab = serde_json::Map::new();
    for (b, c) in table.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    vocab.insert("he".into(), json!(256));
    vocab.insert("ll".into(), json!(257));
    vocab.insert("hell".into(), json!(258));
    let mut specials = vec!["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"];
    specials.extend_from_slice(extra);
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": 259 + i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [BOS], "tokens": ["<|bos|>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": ["h e", "l l", "he ll"]}
    })
    .to_string()
}

const CHATML: &str =
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n\
{{ message['content'] | trim }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn checkpoint(chat_template: Option<&str>) -> TempDir {
    let d = TempDir::new();
    d.write("tokenizer.json", &tokenizer_json(&[]));
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": false,
                      "normalized": false, "rstrip": false, "single_word": false},
        "pad_token": null,
    });
    if let Some(t) = chat_template {
        cfg["chat_template"] = json!(t);
    }
    d.write("tokenizer_config.json", &cfg.to_string());
    d
}

fn msgs() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user("  hello  "),
        ChatMessage::assistant("hi"),
        ChatMessage::user("bye"),
    ]
}

#[test]
fn encode_decode_round_trip() {
    let d = checkpoint(None);
    let t = Tokenizer::from_dir(d.path()).unwrap();
    assert_eq!(t.vocab_size(), 263);
    // Merges apply; ids of single bytes are the byte values.
    assert_eq!(t.encode("hello", false).unwrap(), vec![258, b'o' as u32]);
    assert_eq!(
        t.encode("hello", true).unwrap(),
        vec![BOS, 258, b'o' as u32]
    );
    for text in [
        "hello world",
        "héllo 🙂",
        "tabs\tand\nnewlines  ",
        "",
        "日本語のテキスト",
    ] {
        let ids = t.encode(text, false).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        let with_bos = t.encode(text, true).unwrap();
        assert_eq!(with_bos[0], BOS);
        assert_eq!(t.decode(&with_bos, true).unwrap(), text);
        assert_eq!(
            t.decode(&with_bos, false).unwrap(),
            format!("<|bos|>{text}")
        );
    }
    // Special tokens in the text are recognised as such.
    assert_eq!(
        t.encode("<|im_start|>hi<|im_end|>", false).unwrap(),
        vec![261, b'h' as u32, b'i' as u32, 262]
    );
    assert_eq!(t.token_to_id("<|im_end|>"), Some(262));
    assert_eq!(t.id_to_token(256).as_deref(), Some("he"));
    assert_eq!(t.bos_token(), Some("<|bos|>"));
    assert_eq!(t.bos_token_id(), Some(BOS));
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert_eq!(t.pad_token(), None);
    // No generation_config: EOS = the tokenizer config's eos_token.
    assert_eq!(t.eos_token_ids(), &[262]);
    assert!(!t.is_harmony());
    assert!(!t.has_chat_template());
    // Debug output is short and useful.
    let dbg = format!("{t:?}");
    assert!(dbg.contains("vocab_size: 263"), "{dbg}");
}

#[test]
fn incremental_decode_of_multibyte_characters() {
    let d = checkpoint(None);
    let t = Tokenizer::from_dir(d.path()).unwrap();
    let text = "héllo 🙂 — 日本";
    let ids = t.encode(text, false).unwrap();
    // é is 2 byte tokens, 🙂 4, — 3: plenty of partial characters.
    assert!(ids.len() > text.chars().count());
    let mut stream = t.decode_stream(false);
    let mut out = String::new();
    let mut deltas = Vec::new();
    for &id in &ids {
        if let Some(delta) = stream.step(id).unwrap() {
            assert!(
                !delta.contains('\u{FFFD}'),
                "partial character emitted: {delta:?}"
            );
            out.push_str(&delta);
            deltas.push(delta);
        }
    }
    assert_eq!(stream.flush().unwrap(), None);
    assert_eq!(out, text);
    assert!(deltas.contains(&"🙂".to_string()), "{deltas:?}");
    assert!(deltas.contains(&"é".to_string()), "{deltas:?}");

    // Owned decoder + skip_special_tokens: special tokens produce nothing.
    let mut dec = model::tokenizer::IncrementalDecoder::new(true);
    let mut out = String::new();
    let ids = t.encode("a🙂b", true).unwrap();
    for &id in ids.iter().chain([EOS, b'c' as u32].iter()) {
        if let Some(s) = dec.step(&t, id).unwrap() {
            out.push_str(&s);
        }
    }
    assert_eq!(out, "a🙂bc");

    // A truncated character is held back, then flushed as U+FFFD (like a full decode).
    let ids = t.encode("x🙂", false).unwrap();
    let mut stream = t.decode_stream(false);
    let mut out = String::new();
    for &id in &ids[..ids.len() - 1] {
        if let Some(s) = stream.step(id).unwrap() {
            out.push_str(&s);
        }
    }
    assert_eq!(out, "x");
    assert_eq!(stream.flush().unwrap().as_deref(), Some("\u{FFFD}"));
    assert_eq!(stream.flush().unwrap(), None);

    // Context ids (the prompt's tail) are never emitted.
    let ctx = t.encode("prompt ", false).unwrap();
    let mut dec = model::tokenizer::IncrementalDecoder::with_context(false, &ctx);
    let mut out = String::new();
    for id in t.encode("é!", false).unwrap() {
        if let Some(s) = dec.step(&t, id).unwrap() {
            out.push_str(&s);
        }
    }
    assert_eq!(out, "é!");
}

#[test]
fn chat_template_rendering() {
    let d = checkpoint(Some(CHATML));
    let t = Tokenizer::from_dir(d.path()).unwrap();
    assert!(t.has_chat_template());
    assert_eq!(t.chat_template_names(), vec!["default"]);
    let expected =
        "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n\
<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n";
    assert_eq!(t.apply_chat_template(&msgs(), false).unwrap(), expected);
    let with_prompt = t.apply_chat_template(&msgs(), true).unwrap();
    assert_eq!(with_prompt, format!("{expected}<|im_start|>assistant\n"));
    // The rendered prompt tokenizes with the special tokens recognised.
    let ids = t.encode(&with_prompt, false).unwrap();
    assert_eq!(ids[0], BOS);
    assert_eq!(ids[1], 261);
    assert_eq!(*ids.last().unwrap(), b'\n' as u32);
}

#[test]
fn chat_template_hf_environment() {
    // HF helpers: raise_exception, strftime_now, tojson (Python json.dumps formatting),
    // Python string / dict methods, loop controls, trim_blocks / lstrip_blocks, [::-1],
    // namespace, {% generation %} markers, eos_token.
    let tpl = r#"
{%- if messages[0]['role'] != 'system' -%}
    {{ raise_exception('Conversation must start with a system message, got ' + messages[0]['role']) }}
{%- endif -%}
{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
    {%- if m.role == 'assistant' -%}{% generation %}[A:{{ m.content.strip().upper() }}]{% endgeneration %}{%- continue -%}{%- endif -%}
    {%- set ns.n = ns.n + 1 -%}
    [{{ m.role }}:{{ m.content.strip() }}:{{ m.content.strip().startswith('he') }}]
{%- endfor %}
{% for m in messages[::-1] %}{{ m.role[0] }}{% endfor %}
{{ ns.n }}|{{ strftime_now('%Y') | length }}|{{ eos_token }}
{{ tools | tojson }}
{{ tools[0] | tojson(indent=2) }}
{{ {'a': [1.5, none, true], 'b': 'é<&>"\n'} | tojson }}
{{ {'k': 1} | tojson(separators=(',', ':')) }}
{% if add_generation_prompt %}GO{% endif %}"#;
    let d = checkpoint(Some(tpl));
    let t = Tokenizer::from_dir(d.path()).unwrap();
    let ctx = json!({
        "messages": msgs(),
        "add_generation_prompt": true,
        "tools": [{"name": "f", "parameters": {"x": 1}}],
    });
    let out = t.render_chat_template(None, &ctx).unwrap();
    // trim_blocks eats the newline after `{%- endfor %}` and `{% endfor %}`, as in Jinja2.
    let expected =
        "[system:Be brief.:False][user:hello:True][A:HI][user:bye:False]uaus3|4|<|im_end|>\n\
[{\"name\": \"f\", \"parameters\": {\"x\": 1}}]\n\
{\n  \"name\": \"f\",\n  \"parameters\": {\n    \"x\": 1\n  }\n}\n\
{\"a\": [1.5, null, true], \"b\": \"é<&>\\\"\\n\"}\n\
{\"k\":1}\n\
GO";
    assert_eq!(out, expected);

    // raise_exception surfaces as an error carrying the message.
    let bad = json!({"messages": [ChatMessage::user("x")], "add_generation_prompt": false});
    let err = t.render_chat_template(None, &bad).unwrap_err();
    assert!(
        matches!(err, TokenizerError::ChatTemplate { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("Conversation must start with a system message, got user"),
        "{msg}"
    );
}

#[test]
fn named_templates_and_template_files() {
    // List form with default + tool_use.
    let d = TempDir::new();
    d.write("tokenizer.json", &tokenizer_json(&[]));
    d.write(
        "tokenizer_config.json",
        &json!({
            "bos_token": null,
            "eos_token": "<|eos|>",
            "chat_template": [
                {"name": "default", "template": "D{% for m in messages %}{{ m.content }}{% endfor %}"},
                {"name": "tool_use", "template": "T{{ tools | length }}{{ bos_token }}"}
            ]
        })
        .to_string(),
    );
    let t = Tokenizer::from_dir(d.path()).unwrap();
    assert_eq!(t.chat_template_names(), vec!["default", "tool_use"]);
    assert_eq!(
        t.apply_chat_template(&[ChatMessage::user("x")], true)
            .unwrap(),
        "Dx"
    );
    // tools → tool_use; bos_token undefined renders as empty (as in Jinja).
    let ctx = json!({"messages": [], "tools": [1, 2]});
    assert_eq!(t.render_chat_template(None, &ctx).unwrap(), "T2");
    assert_eq!(t.render_chat_template(Some("default"), &ctx).unwrap(), "D");
    let err = t.render_chat_template(Some("rag"), &ctx).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::UnknownChatTemplate { name, .. } if name == "rag"),
        "{err:?}"
    );
    assert_eq!(t.eos_token_ids(), &[EOS]);

    // chat_template.jinja overrides the config's template; additional_chat_templates/ adds names.
    let d = checkpoint(Some("from config"));
    d.write("chat_template.jinja", "from file {{ messages | length }}\n");
    d.write("additional_chat_templates/rag.jinja", "rag!");
    let t = Tokenizer::from_dir(d.path()).unwrap();
    assert_eq!(t.chat_template_names(), vec!["default", "rag"]);
    assert_eq!(
        t.apply_chat_template(&msgs(), false).unwrap(),
        "from file 4"
    );
    assert_eq!(
        t.render_chat_template(Some("rag"), &json!({})).unwrap(),
        "rag!"
    );

    // chat_template.json (processor style) when nothing else has one.
    let d = checkpoint(None);
    d.write(
        "chat_template.json",
        r#"{"chat_template": "J{{ add_generation_prompt }}"}"#,
    );
    let t = Tokenizer::from_dir(d.path()).unwrap();
    // Booleans print the Python way.
    assert_eq!(t.apply_chat_template(&[], true).unwrap(), "JTrue");
}

#[test]
fn missing_chat_template_and_bad_templates() {
    let d = checkpoint(None);
    let t = Tokenizer::from_dir(d.path()).unwrap();
    let err = t.apply_chat_template(&msgs(), true).unwrap_err();
    assert!(
        matches!(err, TokenizerError::NoChatTemplate { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("no chat template"), "{err}");

    // A template with a syntax error loads (encode still works) and fails only when used.
    let d = checkpoint(Some("{% for m in messages %}{{ m.content }"));
    let t = Tokenizer::from_dir(d.path()).unwrap();
    assert_eq!(t.encode("hi", false).unwrap(), vec![104, 105]);
    let err = t.apply_chat_template(&msgs(), true).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::ChatTemplate { name, .. } if name == "default"),
        "{err:?}"
    );
}

#[test]
fn eos_from_generation_config() {
    // List form, merged with the tokenizer config's eos_token (first), deduplicated.
    let d = checkpoint(None);
    d.write(
        "generation_config.json",
        r#"{"eos_token_id": [260, 262, 5], "temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": true}"#,
    );
    let t = Tokenizer::from_dir(d.path()).unwrap();
    assert_eq!(t.eos_token_ids(), &[262, 260, 5]);
    let g = t.generation_defaults();
    assert_eq!(g.temperature, Some(0.6));
    assert_eq!(g.top_p, Some(0.95));
    assert_eq!(g.top_k, Some(20));
    assert_eq!(g.do_sample, Some(true));
    assert_eq!(g.repetition_penalty, None);

    // Int form.
    let d = checkpoint(None);
    d.write(
        "generation_config.json",
        r#"{"eos_token_id": 260, "bos_token_id": 259}"#,
    );
    let t = Tokenizer::from_dir(d.path()).unwrap();
    assert_eq!(t.eos_token_ids(), &[262, 260]);

    // Null / absent, and no eos_token in the tokenizer config: empty.
    let d = TempDir::new();
    d.write("tokenizer.json", &tokenizer_json(&[]));
    d.write("generation_config.json", r#"{"eos_token_id": null}"#);
    let t = Tokenizer::from_dir(d.path()).unwrap();
    assert!(t.eos_token_ids().is_empty());
    assert!(t.bos_token().is_none());
}

#[test]
fn harmony_stop_tokens() {
    // gpt-oss: <|return|> and <|call|> stop, <|end|> does not, even if a config lists it.
    let extra = [
        "<|start|>",
        "<|end|>",
        "<|message|>",
        "<|channel|>",
        "<|return|>",
        "<|call|>",
        "<|endoftext|>",
    ];
    let d = TempDir::new();
    d.write("tokenizer.json", &tokenizer_json(&extra));
    d.write(
        "tokenizer_config.json",
        r#"{"eos_token": "<|end|>", "pad_token": "<|endoftext|>"}"#,
    );
    let ret = 263 + 4;
    let call = 263 + 5;
    let end = 263 + 1;
    let eot = 263 + 6;
    d.write(
        "generation_config.json",
        &json!({"eos_token_id": [ret, eot, call, end]}).to_string(),
    );
    let t = Tokenizer::from_dir(d.path()).unwrap();
    assert!(t.is_harmony());
    assert_eq!(t.token_to_id("<|return|>"), Some(ret));
    let eos = t.eos_token_ids();
    assert!(
        eos.contains(&ret) && eos.contains(&call) && eos.contains(&eot),
        "{eos:?}"
    );
    assert!(!eos.contains(&end), "{eos:?}");

    // Even with no generation_config the two harmony stops are there.
    let d = TempDir::new();
    d.write("tokenizer.json", &tokenizer_json(&extra));
    let t = Tokenizer::from_dir(d.path()).unwrap();
    let mut eos = t.eos_token_ids().to_vec();
    eos.sort();
    assert_eq!(eos, vec![ret, call]);
}

#[test]
fn missing_and_corrupt_files() {
    // Missing tokenizer.json.
    let d = TempDir::new();
    let err = Tokenizer::from_dir(d.path()).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::MissingFile { path } if path.ends_with("tokenizer.json")),
        "{err:?}"
    );
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    // Missing directory.
    let err = Tokenizer::from_dir(d.path().join("nope")).unwrap_err();
    assert!(matches!(err, TokenizerError::MissingFile { .. }), "{err:?}");

    // Corrupt tokenizer.json (not JSON, and JSON that is not a tokenizer).
    for bad in ["{not json", r#"{"model": {"type": "Nope"}}"#] {
        let d = TempDir::new();
        d.write("tokenizer.json", bad);
        let err = Tokenizer::from_dir(d.path()).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::InvalidFile { path, .. } if path.ends_with("tokenizer.json")),
            "{err:?}"
        );
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }

    // Corrupt optional files are errors naming them.
    for (name, text) in [
        ("tokenizer_config.json", "{"),
        ("generation_config.json", "[1, 2"),
        ("chat_template.json", "nope"),
    ] {
        let d = checkpoint(None);
        d.write(name, text);
        let err = Tokenizer::from_dir(d.path()).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::Json { path, .. } if path.ends_with(name)),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
    // Well-formed JSON with wrong types.
    for (name, text) in [
        ("generation_config.json", r#"{"eos_token_id": "2"}"#),
        ("generation_config.json", r#"{"eos_token_id": [1, -2]}"#),
        ("tokenizer_config.json", r#"{"chat_template": 5}"#),
        (
            "tokenizer_config.json",
            r#"{"chat_template": [{"name": "x"}]}"#,
        ),
        ("tokenizer_config.json", "[]"),
    ] {
        let d = checkpoint(None);
        d.write(name, text);
        let err = Tokenizer::from_dir(d.path()).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::InvalidFile { path, .. } if path.ends_with(name)),
            "{name} {text}: {err:?}"
        );
    }
}

fn fixture_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let mut out = Vec::new();
    for model in [
        "gpt-oss/bf16",
        "gpt-oss/mxfp4",
        "qwen3-moe/native",
        "mimo-v2-flash/native",
    ] {
        let p = root.join(model);
        if p.join("tokenizer.json").is_file() {
            out.push(p);
        }
    }
    out
}

#[test]
fn hf_fixtures_load() {
    let dirs = fixture_dirs();
    if dirs.is_empty() {
        eprintln!("fixtures/ not present; skipping");
        return;
    }
    for dir in dirs {
        let t = Tokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert_eq!(t.vocab_size(), 256, "{}", dir.display());
        // id = byte value.
        let text = "héllo 🙂";
        let ids = t.encode(text, false).unwrap();
        assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        let mut stream = t.decode_stream(true);
        let mut out = String::new();
        for &id in &ids {
            if let Some(s) = stream.step(id).unwrap() {
                out.push_str(&s);
            }
        }
        assert_eq!(out, text);
        assert_eq!(t.eos_token_ids(), &[1, 2], "{}", dir.display());
        assert!(!t.is_harmony());
        let prompt = t
            .apply_chat_template(&[ChatMessage::user("hi")], true)
            .unwrap();
        assert_eq!(prompt, "<|user|>hi<|assistant|>");
        assert_eq!(
            t.apply_chat_template(&[ChatMessage::user("hi")], false)
                .unwrap(),
            "<|user|>hi"
        );
    }
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    check::<model::tokenizer::IncrementalDecoder>();
    check::<TokenizerError>();
}
