from shira_diffusion.app.cli import main

main()
