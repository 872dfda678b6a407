//! A WASI command, not a room: partyhost must refuse to load it.

fn main() {
    println!("this component exports wasi:cli/run, not the partyhost room exports");
}
