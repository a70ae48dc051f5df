from fedhealth.cli import main

main()
