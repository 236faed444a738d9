"""Development tooling that is not part of the node proxy: the simulated cluster the
tests and the demo run on (`testbed`), the benchmark suite (`bench`) and the two CLI
subcommands built on them (`nodeproxy demo`, `nodeproxy bench`).

It ships in the source checkout only: the image and an installed daemon carry
`nodeproxy` alone, and `nodeproxy.cli.main` offers `demo` and `bench` only where this
package can be imported.  Nothing in `nodeproxy` imports it.
"""
