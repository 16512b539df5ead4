//! Runs the minimal KVM guest and checks what it wrote. Exit 0 only if the
//! guest's bytes arrived intact and it halted.

fn main() -> anyhow::Result<()> {
    let message = b"Husk KVM OK";
    let got = husk_tests::kvm_smoke::run(message)?;
    if got != message {
        anyhow::bail!(
            "the guest wrote {:?}, expected {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(message)
        );
    }
    println!(
        "kvm-smoke: guest wrote {:?} and halted",
        String::from_utf8_lossy(&got)
    );
    Ok(())
}
