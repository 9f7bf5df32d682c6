from antidote.cli import main

raise SystemExit(main())
