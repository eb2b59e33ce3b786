//! Runs one input through one harness: `cargo run -p fuzz-replay --example replay_one --
//! TARGET FILE` (with `FUZZ_TRACE=1` to see what the harness does).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, target, file] = &args[..] else {
        eprintln!("usage: replay_one TARGET FILE");
        std::process::exit(2);
    };
    let harness = fuzz_replay::TARGETS
        .iter()
        .find(|t| t.0 == target)
        .unwrap_or_else(|| panic!("no target {target}"))
        .1;
    harness(&std::fs::read(file).expect("input"));
    println!("{target}: {file}: ok");
}
