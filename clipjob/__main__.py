from clipjob.cli import main

main()
