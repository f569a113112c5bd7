from bench.micro.run import main

raise SystemExit(main())
