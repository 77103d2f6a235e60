//! Load generator for tally. This package is a skeleton: the scenarios, the
//! side-by-side comparison and the reports arrive with the benchmarks issue.

fn main() {
    eprintln!("tally-loadtest: no scenarios yet; see loadtest/README.md");
    std::process::exit(2);
}
