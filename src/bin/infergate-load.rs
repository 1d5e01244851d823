//! `infergate-load`: the load generator of `crates/load` (see `infergate_load::load`).

fn main() -> std::process::ExitCode {
    infergate_load::load::main()
}
