from cluster_registry.cli import main

main()
