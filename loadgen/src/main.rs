//! `loadgen`: see the library documentation (`src/lib.rs`) and `loadgen --help`.

fn main() {
    std::process::exit(loadgen::cli::main());
}
