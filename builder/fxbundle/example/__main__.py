from fxbundle.example.training import main

main()
