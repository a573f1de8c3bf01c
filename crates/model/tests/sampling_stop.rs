//! StopChecker tests: stop strings across tokens, held-back text, stop tokens / EOS, length,
//! and the streaming invariant (streamed text is always a prefix of the final text).

use model::sampling::{FinishReason, SamplingParams, StopCause, StopChecker, StopStatus};

fn emit(s: &StopStatus) -> &str {
    match s {
        StopStatus::Continue { emit } => emit,
        StopStatus::Stop { trim, .. } => trim,
    }
}

fn is_stop(s: &StopStatus) -> bool {
    matches!(s, StopStatus::Stop { .. })
}

#[test]
fn stop_string_split_across_three_tokens() {
    let mut c = StopChecker::new(vec![], vec!["STOP".into()]);
    assert_eq!(
        c.push(10, "abc S"),
        StopStatus::Continue {
            emit: "abc ".into()
        }
    );
    assert_eq!(c.held_back(), "S");
    assert_eq!(c.push(11, "TO"), StopStatus::Continue { emit: "".into() });
    assert_eq!(c.held_back(), "STO");
    assert_eq!(
        c.push(12, "P and more"),
        StopStatus::Stop {
            reason: FinishReason::Stop,
            cause: StopCause::StopString("STOP".into()),
            trim: "".into(),
        }
    );
    assert_eq!(c.text(), "abc ");
    assert!(c.is_finished());

    // Text before the stop string inside the last token is still emitted.
    let mut c = StopChecker::new(vec![], vec!["</s>".into()]);
    assert_eq!(emit(&c.push(1, "x <")), "x ");
    assert_eq!(emit(&c.push(2, "/")), "");
    let s = c.push(3, "s>");
    assert!(is_stop(&s));
    assert_eq!(emit(&s), "");
    assert_eq!(c.text(), "x ");
    let mut c = StopChecker::new(vec![], vec!["END".into()]);
    assert_eq!(emit(&c.push(1, "E")), "");
    assert_eq!(emit(&c.push(2, "N")), "");
    let s = c.push(3, "D");
    assert!(is_stop(&s));
    assert_eq!(c.text(), "");
    let mut c = StopChecker::new(vec![], vec!["END".into()]);
    let s = c.push(1, "fooEND");
    assert_eq!(emit(&s), "foo");
    assert!(is_stop(&s));
}

#[test]
fn held_back_text_is_released_when_not_a_stop() {
    let mut c = StopChecker::new(vec![], vec!["STOP".into()]);
    assert_eq!(emit(&c.push(1, "ST")), "");
    assert_eq!(emit(&c.push(2, "A")), "STA");
    assert_eq!(c.held_back(), "");
    // A partial match that fails but whose tail starts a new partial match.
    assert_eq!(emit(&c.push(3, " STO")), " ");
    assert_eq!(emit(&c.push(4, "STO")), "STO");
    assert_eq!(c.held_back(), "STO");
    assert_eq!(emit(&c.push(5, "!")), "STO!");
    assert_eq!(c.text(), "STA STOSTO!");
    // finish() releases whatever is held back.
    assert_eq!(emit(&c.push(6, "S")), "");
    assert_eq!(c.finish(), "S");
    assert_eq!(c.text(), "STA STOSTO!S");
}

#[test]
fn multibyte_stop_strings_and_text() {
    let mut c = StopChecker::new(vec![], vec!["🙂!".into(), "。".into()]);
    assert_eq!(emit(&c.push(1, "héllo 🙂")), "héllo ");
    assert_eq!(emit(&c.push(2, "?")), "🙂?");
    assert_eq!(emit(&c.push(3, "日本")), "日本");
    let s = c.push(4, "語。次");
    assert_eq!(emit(&s), "語");
    assert_eq!(c.text(), "héllo 🙂?日本語");
}

#[test]
fn earliest_stop_string_wins() {
    let mut c = StopChecker::new(vec![], vec!["world".into(), "lo".into()]);
    let s = c.push(1, "hello world");
    assert_eq!(
        s,
        StopStatus::Stop {
            reason: FinishReason::Stop,
            cause: StopCause::StopString("lo".into()),
            trim: "hel".into()
        }
    );
    // Same position: the first listed wins.
    let mut c = StopChecker::new(vec![], vec!["ab".into(), "abc".into()]);
    match c.push(1, "xabc") {
        StopStatus::Stop { cause, trim, .. } => {
            assert_eq!(cause, StopCause::StopString("ab".into()));
            assert_eq!(trim, "x");
        }
        s => panic!("{s:?}"),
    }
}

#[test]
fn eos_and_stop_tokens() {
    let p = SamplingParams {
        stop_token_ids: vec![7],
        stop_strings: vec!["##".into()],
        max_tokens: 100,
        ..SamplingParams::default()
    };
    // EOS: its text is not emitted; held-back text is released.
    let mut c = StopChecker::from_params(&p, &[2, 3]);
    assert_eq!(emit(&c.push(10, "a #")), "a ");
    assert_eq!(
        c.push(3, "</s>"),
        StopStatus::Stop {
            reason: FinishReason::Stop,
            cause: StopCause::Eos(3),
            trim: "#".into()
        }
    );
    assert_eq!(c.text(), "a #");
    assert_eq!(c.stop_cause(), Some(&StopCause::Eos(3)));
    // Pushing after a stop repeats the stop with no text.
    match c.push(11, "more") {
        StopStatus::Stop { cause, trim, .. } => {
            assert_eq!(cause, StopCause::Eos(3));
            assert_eq!(trim, "");
        }
        s => panic!("{s:?}"),
    }
    assert_eq!(c.text(), "a #");

    // Stop token id.
    let mut c = StopChecker::from_params(&p, &[2]);
    assert_eq!(emit(&c.push(10, "b")), "b");
    assert_eq!(
        c.push(7, "<|call|>"),
        StopStatus::Stop {
            reason: FinishReason::Stop,
            cause: StopCause::StopToken(7),
            trim: "".into()
        }
    );

    // ignore_eos: EOS is ordinary text, stop_token_ids still stop.
    let q = SamplingParams {
        ignore_eos: true,
        ..p.clone()
    };
    let mut c = StopChecker::from_params(&q, &[2]);
    assert_eq!(
        c.push(2, "</s>"),
        StopStatus::Continue {
            emit: "</s>".into()
        }
    );
    assert!(is_stop(&c.push(7, "")));

    // Plain constructor + builders.
    let mut c = StopChecker::new(vec![5], vec![]).with_eos(&[0]);
    assert!(matches!(
        c.push(0, ""),
        StopStatus::Stop {
            cause: StopCause::Eos(0),
            ..
        }
    ));
}

#[test]
fn max_tokens_is_length() {
    let p = SamplingParams {
        max_tokens: 3,
        stop_strings: vec!["xyz".into()],
        ..SamplingParams::default()
    };
    let mut c = StopChecker::from_params(&p, &[0]);
    assert_eq!(emit(&c.push(1, "a")), "a");
    assert_eq!(emit(&c.push(2, "b x")), "b ");
    // The length stop releases held-back text (it was not a stop string).
    assert_eq!(
        c.push(3, "y"),
        StopStatus::Stop {
            reason: FinishReason::Length,
            cause: StopCause::MaxTokens,
            trim: "xy".into()
        }
    );
    assert_eq!(c.text(), "ab xy");
    assert_eq!(c.num_tokens(), 3);
    // A stop string completed by the last allowed token is a stop, not a length.
    let mut c = StopChecker::from_params(&p, &[0]);
    c.push(1, "a");
    c.push(2, "xy");
    match c.push(3, "z") {
        StopStatus::Stop { reason, cause, .. } => {
            assert_eq!(reason, FinishReason::Stop);
            assert_eq!(cause, StopCause::StopString("xyz".into()));
        }
        s => panic!("{s:?}"),
    }
    let mut c = StopChecker::new(vec![], vec![]).with_max_tokens(1);
    assert!(matches!(
        c.push(9, "hi"),
        StopStatus::Stop {
            reason: FinishReason::Length,
            ..
        }
    ));
    assert_eq!(FinishReason::Length.as_str(), "length");
    assert_eq!(FinishReason::Stop.to_string(), "stop");
}

/// Splits `text` into pieces at char boundaries using a simple LCG.
fn split(text: &str, seed: u64) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut state = seed;
    let mut i = 0;
    while i < chars.len() {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 1 + ((state >> 33) % 4) as usize;
        let end = (i + len).min(chars.len());
        out.push(chars[i..end].iter().collect());
        // Occasionally an empty delta (a token that decodes to nothing yet).
        if (state >> 20).is_multiple_of(7) {
            out.push(String::new());
        }
        i = end;
    }
    out
}

#[test]
fn streaming_never_emits_part_of_a_stop_string() {
    let stops: Vec<String> = vec!["<|im_end|>".into(), "\n\nUser:".into(), "ééé".into()];
    let texts = [
        "Hello <|im_e nd|> there\n\nUser and <|im_end|> tail",
        "a\n\nUse\n\nUser: hi",
        "ééèéééx",
        "no stop at all <|im_en",
        "<|im_end|>",
    ];
    for text in texts {
        let expected_end = stops.iter().filter_map(|s| text.find(s.as_str())).min();
        let expected = &text[..expected_end.unwrap_or(text.len())];
        for seed in 0..40 {
            let mut c = StopChecker::new(vec![], stops.clone());
            let mut streamed = String::new();
            let mut stopped = false;
            for (i, piece) in split(text, seed).iter().enumerate() {
                let s = c.push(i as u32, piece);
                streamed.push_str(emit(&s));
                assert!(
                    expected.starts_with(&streamed),
                    "{text:?} seed {seed}: streamed {streamed:?} is not a prefix of {expected:?}"
                );
                if is_stop(&s) {
                    stopped = true;
                    break;
                }
            }
            if !stopped {
                streamed.push_str(&c.finish());
            }
            assert_eq!(stopped, expected_end.is_some(), "{text:?}");
            assert_eq!(streamed, expected, "{text:?} seed {seed}");
            assert_eq!(c.text(), expected);
        }
    }
}

#[test]
fn types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<StopChecker>();
    check::<model::sampling::Sampler>();
    check::<model::sampling::SamplingError>();
}
