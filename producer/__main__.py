from kleinfarm.producer.cli import main

main()
