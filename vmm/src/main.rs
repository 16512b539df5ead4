fn main() -> anyhow::Result<()> {
    anyhow::bail!("husk-vmm cannot boot a VM yet: the VMM lands with its own issue")
}
