//! A small gRPC client for `ultra serve`: model info, then one streamed generation printed as it
//! arrives, with usage, timing and (with a drafter) acceptance statistics.
//!
//! ```text
//! ultra serve --model fixtures/qwen3-moe/native &
//! cargo run -p serve --example grpc_client -- http://127.0.0.1:50051 "The quick brown fox" 32
//! ```

use std::io::Write;

use serve::proto::v1 as pb;
use serve::proto::v1::engine_client::EngineClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let prompt = args.next().unwrap_or_else(|| "Hello".into());
    let max_tokens: u32 = args.next().map_or(Ok(32), |s| s.parse())?;

    let mut client = EngineClient::connect(url).await?;
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await?
        .into_inner();
    eprintln!(
        "model {} ({}, {} layers, context {}, on {}{})",
        info.model_id,
        info.architecture,
        info.num_layers,
        info.max_context_length,
        info.device,
        if info.speculative {
            format!(", speculative block {}", info.block_size)
        } else {
            String::new()
        }
    );

    let request = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Text(prompt)),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(request).await?.into_inner();
    let mut out = std::io::stdout();
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::generate_response::Event::Chunk(c)) => {
                out.write_all(c.text.as_bytes())?;
                out.flush()?;
            }
            Some(pb::generate_response::Event::Complete(c)) => {
                println!();
                let u = c.usage.unwrap_or_default();
                let t = c.timing.unwrap_or_default();
                eprintln!(
                    "[{}] finish {} ({}), prompt {} + generated {} tokens, TTFT {:.1} ms, total {:.1} ms",
                    msg.request_id,
                    c.finish_reason,
                    c.stop_cause,
                    u.prompt_tokens,
                    u.completion_tokens,
                    t.time_to_first_token_ns as f64 / 1e6,
                    t.e2e_ns as f64 / 1e6
                );
                if let Some(s) = c.spec {
                    eprintln!(
                        "speculative: {} drafts, {} / {} draft tokens accepted, mean acceptance length {:.2}",
                        s.drafts, s.accepted_tokens, s.draft_tokens, s.mean_acceptance_length
                    );
                }
                if !c.error.is_empty() {
                    eprintln!("error: {}", c.error);
                }
            }
            None => {}
        }
    }
    Ok(())
}
