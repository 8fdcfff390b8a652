fn main() {
    if let Err(e) = picoimg::cli::main() {
        eprintln!("picoimg: error: {e:#}");
        std::process::exit(if picoimg::interrupt::requested() {
            130
        } else {
            1
        });
    }
}
