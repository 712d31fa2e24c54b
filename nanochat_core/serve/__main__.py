from nanochat_core.serve.server import main

main()
