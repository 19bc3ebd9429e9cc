from moderation.main.cli import main

main()
