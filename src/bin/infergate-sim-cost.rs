//! `infergate-sim-cost`: the simulator's cost tool of `crates/load` (see
//! `infergate_load::sim_cost`).

fn main() -> anyhow::Result<()> {
    infergate_load::sim_cost::main()
}
