from courier_api.cli import main

main()
